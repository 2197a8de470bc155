//! Rendezvous on loopback: real child processes fetching rank 0's payload,
//! retries, refusals and timeouts, all bounded in time.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fpdt_comm::rendezvous::{fetch, RendezvousEnv, RendezvousServer};
use fpdt_comm::CommError;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn payload() -> Vec<u8> {
    (0..128u32).map(|i| (i * 7 + 3) as u8).collect()
}

/// Rank `rank` of `world` as a process of `fpdt-rendezvous-check`, with
/// torchrun's variables pointing at `port` on loopback.
fn rank_process(rank: usize, world: usize, port: u16, args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_fpdt-rendezvous-check"))
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env_remove("SLURM_PROCID")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[test]
fn child_processes_fetch_the_id_from_rank_0() {
    let world = 4;
    let server = RendezvousServer::bind("127.0.0.1", 0, world).unwrap();
    let port = server.port().unwrap();
    // The ranks are real processes: the crate's `fpdt-rendezvous-check`.
    let mut children = Vec::new();
    for rank in 1..world {
        let child = rank_process(rank, world, port, &["--timeout-secs", "20"]);
        children.push((rank, child));
    }
    let served = server.serve(&payload(), Duration::from_secs(30));
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = hex(&payload());
    for (rank, mut child) in children {
        // Bounded wait: kill a child that overstays.
        loop {
            match child.try_wait().unwrap() {
                Some(_) => break,
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    break;
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("RANK {rank} ID {want}")),
            "rank {rank} printed: {stdout}"
        );
    }
    served.unwrap();
}

#[test]
fn clients_retry_until_the_server_comes_up() {
    let world = 3;
    let port = free_port();
    let clients: Vec<_> = (1..world)
        .map(|rank| {
            std::thread::spawn(move || {
                fetch("127.0.0.1", port, rank, world, Duration::from_secs(20))
            })
        })
        .collect();
    // The clients start first and find nothing listening.
    std::thread::sleep(Duration::from_millis(300));
    let server = RendezvousServer::bind("127.0.0.1", port, world).unwrap();
    server.serve(&payload(), Duration::from_secs(20)).unwrap();
    for c in clients {
        assert_eq!(c.join().unwrap().unwrap(), payload());
    }
}

#[test]
fn a_missing_server_is_a_timeout_in_bounded_time() {
    let port = free_port();
    let t = Instant::now();
    let e = fetch("127.0.0.1", port, 1, 2, Duration::from_millis(300)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(e.is_timeout(), "{e}");
    assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}");
}

#[test]
fn a_rank_that_never_connects_times_the_server_out_naming_it() {
    let world = 3;
    let server = RendezvousServer::bind("127.0.0.1", 0, world).unwrap();
    let port = server.port().unwrap();
    let client =
        std::thread::spawn(move || fetch("127.0.0.1", port, 1, world, Duration::from_secs(10)));
    let t = Instant::now();
    let e = server
        .serve(&payload(), Duration::from_millis(500))
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.is_timeout(), "{e}");
    assert!(e.to_string().contains("rank(s) [2]"), "{e}");
    assert_eq!(
        client.join().unwrap().unwrap(),
        payload(),
        "rank 1 was served"
    );
}

#[test]
fn a_wrong_world_size_is_refused_on_both_sides() {
    let server = RendezvousServer::bind("127.0.0.1", 0, 2).unwrap();
    let port = server.port().unwrap();
    let client =
        std::thread::spawn(move || fetch("127.0.0.1", port, 1, 5, Duration::from_secs(10)));
    let e = server
        .serve(&payload(), Duration::from_secs(10))
        .unwrap_err();
    assert!(e.to_string().contains("says the world has 5 ranks"), "{e}");
    let e = client.join().unwrap().unwrap_err();
    assert!(matches!(e, CommError::Rendezvous(_)), "{e}");
    assert!(e.to_string().contains("rank 0 refused rank 1"), "{e}");
}

#[test]
fn fetch_refuses_a_rank_out_of_range() {
    let e = fetch("127.0.0.1", 1, 3, 3, Duration::from_millis(10)).unwrap_err();
    assert!(
        matches!(
            e,
            CommError::RankOutOfRange {
                rank: 3,
                world: 3,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_world_of_one_needs_no_server() {
    let env = RendezvousEnv::from_lookup(|k| match k {
        "RANK" => Some("0".into()),
        "WORLD_SIZE" => Some("1".into()),
        "MASTER_ADDR" => Some("127.0.0.1".into()),
        "MASTER_PORT" => Some(free_port().to_string()),
        _ => None,
    })
    .unwrap();
    let got = env
        .share_from_rank0(Duration::from_millis(200), || Ok(payload()))
        .unwrap();
    assert_eq!(got, payload());
}

/// Every rank a process of `fpdt-rendezvous-check`, rank 0 serving.
#[test]
fn the_check_binary_runs_every_rank() {
    let world = 3;
    let port = free_port();
    let kids: Vec<_> = (0..world)
        .map(|rank| {
            rank_process(
                rank,
                world,
                port,
                &["--timeout-secs", "20", "--payload", "c0ffee01"],
            )
        })
        .collect();
    for (rank, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "rank {rank}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("RANK {rank} ID c0ffee01")),
            "{stdout}"
        );
    }
}

#[test]
fn the_check_binary_names_a_bad_argument() {
    let exe = env!("CARGO_BIN_EXE_fpdt-rendezvous-check");
    for (args, want) in [
        (vec!["--payload", "xyz"], "--payload `xyz`"),
        (vec!["--timeout-secs", "-1"], "--timeout-secs `-1`"),
        (vec!["--frobnicate"], "unknown argument `--frobnicate`"),
    ] {
        let out = Command::new(exe).args(&args).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // Without launcher variables: the variable that is missing is named.
    let out = Command::new(exe)
        .env_remove("RANK")
        .env_remove("SLURM_PROCID")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("RANK") || err.contains("SLURM"), "{err}");
}
