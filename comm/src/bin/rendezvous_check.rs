//! `fpdt-rendezvous-check`: tries the rendezvous a multi-process run would
//! do, from the variables torchrun or Slurm set (RANK, WORLD_SIZE,
//! LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or SLURM_PROCID, SLURM_NTASKS,
//! SLURM_LOCALID): rank 0 serves a payload, every other rank fetches it,
//! and each prints `RANK <r> ID <hex>`. Run it under the launcher (for
//! example `torchrun --nproc-per-node 4 fpdt-rendezvous-check`) before a
//! long job to see that the ranks find each other; it needs no GPU.
//!
//! Options: `--timeout-secs N` (default 60), `--payload HEX` (rank 0's
//! payload; default: 16 bytes from the clock).

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fpdt_comm::rendezvous::RendezvousEnv;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.is_empty() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn run() -> Result<(), String> {
    let mut timeout = Duration::from_secs(60);
    let mut payload = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--timeout-secs" => {
                let v = args.next().unwrap_or_default();
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or(format!(
                        "--timeout-secs `{v}`: give a positive number of seconds"
                    ))?;
                timeout = Duration::from_secs_f64(secs);
            }
            "--payload" => {
                let v = args.next().unwrap_or_default();
                payload = Some(unhex(&v).ok_or(format!(
                    "--payload `{v}`: give an even number of hex digits"
                ))?);
            }
            "-h" | "--help" => {
                println!(
                    "fpdt-rendezvous-check [--timeout-secs N] [--payload HEX]: rank 0 serves, \
                     the others fetch; run under torchrun or srun"
                );
                return Ok(());
            }
            other => return Err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    let env = RendezvousEnv::from_env().map_err(|e| e.to_string())?;
    let got = env
        .share_from_rank0(timeout, || {
            Ok(payload.unwrap_or_else(|| {
                let t = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                t.to_le_bytes().to_vec()
            }))
        })
        .map_err(|e| format!("rank {}: {e}", env.rank))?;
    println!("RANK {} ID {}", env.rank, hex(&got));
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fpdt-rendezvous-check: {e}");
            ExitCode::FAILURE
        }
    }
}
