//! The `fpdt` command: train, prepare, plan, info (see `fpdt --help`).

fn main() -> std::process::ExitCode {
    fpdt_model::cli::main()
}
