//! Rendezvous: who am I, and the bytes every rank must share before NCCL
//! starts (its unique id).
//!
//! [`RendezvousEnv`] reads the environment torchrun sets (`RANK`,
//! `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`) or Slurm's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, with `MASTER_ADDR`
//! exported by the batch script, e.g.
//! `export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)`,
//! and `MASTER_PORT` defaulting to 29500).
//!
//! Rank 0 serves a payload over TCP on `MASTER_ADDR:MASTER_PORT`
//! ([`RendezvousServer`]); every other rank connects, with retries until a
//! deadline, and fetches it ([`fetch`]). The protocol is tiny: the client
//! sends a magic, its rank and its world size; the server checks them and
//! answers with the payload, or with a refusal the client reports. Every
//! wait is bounded: a server that never comes, or a rank that never
//! connects, ends in [`CommError::Timeout`] naming what was missing.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{CommError, Result};

const MAGIC: &[u8; 8] = b"FPDTRDZ1";
const MAX_PAYLOAD: usize = 1 << 20;
/// The port Slurm jobs use when `MASTER_PORT` is unset.
pub const DEFAULT_PORT: u16 = 29500;

/// Which launcher set the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun / torch.distributed (`RANK`, `WORLD_SIZE`, ...).
    Torchrun,
    /// Slurm's srun (`SLURM_PROCID`, `SLURM_NTASKS`, ...).
    Slurm,
}

/// This process's place in the job, from the launcher's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousEnv {
    /// Global rank.
    pub rank: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Rank within the node (which GPU to use).
    pub local_rank: usize,
    /// Host of rank 0's rendezvous server.
    pub master_addr: String,
    /// Its port.
    pub master_port: u16,
    /// Where the values came from.
    pub launcher: Launcher,
}

fn parse_usize(var: &'static str, value: &str) -> Result<usize> {
    value.trim().parse().map_err(|_| CommError::Env {
        var,
        value: value.to_string(),
        rule: "must be a non-negative integer".into(),
    })
}

impl RendezvousEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<RendezvousEnv> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads the variables through `get` (for tests and embedding):
    /// torchrun's when `RANK` is set, else Slurm's when `SLURM_PROCID` is.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<RendezvousEnv> {
        let need = |var: &'static str, rule: &str| {
            get(var).ok_or_else(|| CommError::Env {
                var,
                value: String::new(),
                rule: rule.to_string(),
            })
        };
        let (launcher, rank, world, local) = if let Some(r) = get("RANK") {
            let world = need("WORLD_SIZE", "must be set with RANK (torchrun sets both)")?;
            (
                Launcher::Torchrun,
                parse_usize("RANK", &r)?,
                parse_usize("WORLD_SIZE", &world)?,
                match get("LOCAL_RANK") {
                    Some(l) => parse_usize("LOCAL_RANK", &l)?,
                    None => 0,
                },
            )
        } else if let Some(r) = get("SLURM_PROCID") {
            let world = need(
                "SLURM_NTASKS",
                "must be set with SLURM_PROCID (srun sets both)",
            )?;
            (
                Launcher::Slurm,
                parse_usize("SLURM_PROCID", &r)?,
                parse_usize("SLURM_NTASKS", &world)?,
                match get("SLURM_LOCALID") {
                    Some(l) => parse_usize("SLURM_LOCALID", &l)?,
                    None => 0,
                },
            )
        } else {
            return Err(CommError::Env {
                var: "RANK",
                value: String::new(),
                rule: "not set, and neither is SLURM_PROCID: launch with torchrun or srun, or \
                       set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
                    .into(),
            });
        };
        if world == 0 {
            return Err(CommError::Env {
                var: if launcher == Launcher::Torchrun {
                    "WORLD_SIZE"
                } else {
                    "SLURM_NTASKS"
                },
                value: "0".into(),
                rule: "must be at least 1".into(),
            });
        }
        if rank >= world {
            return Err(CommError::RankOutOfRange {
                what: format!("rendezvous environment ({launcher:?})"),
                rank,
                world,
            });
        }
        let master_addr = need(
            "MASTER_ADDR",
            "must name rank 0's host (torchrun sets it; under Slurm export it in the batch script)",
        )?;
        if master_addr.trim().is_empty() {
            return Err(CommError::Env {
                var: "MASTER_ADDR",
                value: master_addr,
                rule: "must name rank 0's host".into(),
            });
        }
        let master_port = match get("MASTER_PORT") {
            Some(p) => match p.trim().parse::<u16>() {
                Ok(v) if v > 0 => v,
                _ => {
                    return Err(CommError::Env {
                        var: "MASTER_PORT",
                        value: p,
                        rule: "must be a TCP port, 1..=65535".into(),
                    })
                }
            },
            None if launcher == Launcher::Slurm => DEFAULT_PORT,
            None => {
                return Err(CommError::Env {
                    var: "MASTER_PORT",
                    value: String::new(),
                    rule: "must be set with MASTER_ADDR (torchrun sets both)".into(),
                })
            }
        };
        Ok(RendezvousEnv {
            rank,
            world_size: world,
            local_rank: local,
            master_addr: master_addr.trim().to_string(),
            master_port,
            launcher,
        })
    }

    /// Rank 0 serves `make()`'s bytes; every other rank fetches them. Each
    /// rank returns the same bytes, or an error within `timeout`.
    pub fn share_from_rank0(
        &self,
        timeout: Duration,
        make: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        if self.rank == 0 {
            let server =
                RendezvousServer::bind(&self.master_addr, self.master_port, self.world_size)?;
            let payload = make()?;
            server.serve(&payload, timeout)?;
            Ok(payload)
        } else {
            fetch(
                &self.master_addr,
                self.master_port,
                self.rank,
                self.world_size,
                timeout,
            )
        }
    }
}

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| CommError::io(format!("resolving MASTER_ADDR `{host}`"), e))?
        .collect();
    if addrs.is_empty() {
        return Err(CommError::Rendezvous(format!(
            "MASTER_ADDR `{host}` resolves to no address"
        )));
    }
    Ok(addrs)
}

/// Rank 0's side: a listening socket that hands a payload to every other
/// rank once.
#[derive(Debug)]
pub struct RendezvousServer {
    listener: TcpListener,
    world: usize,
}

impl RendezvousServer {
    /// Listens on `host:port` (port 0: any free port, see
    /// [`RendezvousServer::port`]) for the `world - 1` other ranks. Where
    /// `host` is not an address of this machine, listens on all interfaces.
    pub fn bind(host: &str, port: u16, world: usize) -> Result<RendezvousServer> {
        if world == 0 {
            return Err(CommError::Invalid(
                "rendezvous server: world size must be at least 1".into(),
            ));
        }
        let addrs = resolve(host, port)?;
        let listener = match TcpListener::bind(&addrs[..]) {
            Ok(l) => l,
            Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
                TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
                    CommError::io(format!("listening on 0.0.0.0:{port} for the rendezvous"), e)
                })?
            }
            Err(e) => {
                return Err(CommError::io(
                    format!("listening on {host}:{port} for the rendezvous"),
                    e,
                ))
            }
        };
        Ok(RendezvousServer { listener, world })
    }

    /// The port it listens on.
    pub fn port(&self) -> Result<u16> {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .map_err(|e| CommError::io("reading the rendezvous server's address", e))
    }

    /// Serves `payload` until every rank `1..world` has it, or `timeout`
    /// passes ([`CommError::Timeout`] naming the ranks that never came). A
    /// client with the wrong world size or a rank out of range is refused,
    /// and the refusal is also this call's error.
    pub fn serve(self, payload: &[u8], timeout: Duration) -> Result<()> {
        if payload.len() > MAX_PAYLOAD {
            return Err(CommError::Invalid(format!(
                "rendezvous payload of {} bytes is over the limit of {MAX_PAYLOAD}",
                payload.len()
            )));
        }
        self.listener
            .set_nonblocking(true)
            .map_err(|e| CommError::io("making the rendezvous socket non-blocking", e))?;
        let deadline = Instant::now() + timeout;
        let mut served = vec![false; self.world];
        served[0] = true;
        while served.iter().any(|s| !s) {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..self.world).filter(|&r| !served[r]).collect();
                return Err(CommError::Timeout {
                    what: format!(
                        "rank(s) {missing:?} to fetch the rendezvous payload from rank 0"
                    ),
                    secs: timeout.as_secs_f64(),
                });
            }
            match self.listener.accept() {
                Ok((stream, _peer)) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.handle(stream, payload, left.max(Duration::from_millis(10))) {
                        Ok(Some(rank)) => served[rank] = true,
                        // A connection that spoke something else: ignore it.
                        Ok(None) => {}
                        // The client went away mid-exchange; it retries.
                        Err(CommError::Io { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(CommError::io("accepting a rendezvous connection", e)),
            }
        }
        Ok(())
    }

    /// One client: read its hello, answer. `Ok(None)` for a stranger.
    fn handle(&self, mut s: TcpStream, payload: &[u8], left: Duration) -> Result<Option<usize>> {
        let io = |what: &str| {
            let what = what.to_string();
            move |e| CommError::io(what, e)
        };
        s.set_nonblocking(false)
            .map_err(io("configuring a rendezvous connection"))?;
        let t = left.min(Duration::from_secs(5));
        s.set_read_timeout(Some(t))
            .map_err(io("configuring a rendezvous connection"))?;
        s.set_write_timeout(Some(t))
            .map_err(io("configuring a rendezvous connection"))?;
        let mut hello = [0u8; 16];
        s.read_exact(&mut hello)
            .map_err(io("reading a rendezvous hello"))?;
        if &hello[..8] != MAGIC {
            return Ok(None);
        }
        let rank = u32::from_le_bytes([hello[8], hello[9], hello[10], hello[11]]) as usize;
        let world = u32::from_le_bytes([hello[12], hello[13], hello[14], hello[15]]) as usize;
        let refusal = if world != self.world {
            Some(format!(
                "rank {rank} says the world has {world} ranks, but rank 0 has WORLD_SIZE {}",
                self.world
            ))
        } else if rank == 0 || rank >= self.world {
            Some(format!(
                "a client claims rank {rank}, which is not in 1..{} (rank 0 serves)",
                self.world
            ))
        } else {
            None
        };
        let (status, body) = match &refusal {
            Some(msg) => (1u8, msg.as_bytes()),
            None => (0u8, payload),
        };
        let mut reply = Vec::with_capacity(13 + body.len());
        reply.extend_from_slice(MAGIC);
        reply.push(status);
        reply.extend_from_slice(&(body.len() as u32).to_le_bytes());
        reply.extend_from_slice(body);
        s.write_all(&reply)
            .map_err(io("answering a rendezvous client"))?;
        match refusal {
            Some(msg) => Err(CommError::Rendezvous(msg)),
            None => Ok(Some(rank)),
        }
    }
}

/// A rank's side: connects to rank 0's server at `host:port` (retrying
/// while it is not up yet) and fetches the payload; gives up after
/// `timeout`.
pub fn fetch(
    host: &str,
    port: u16,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<Vec<u8>> {
    if rank >= world {
        return Err(CommError::RankOutOfRange {
            what: "rendezvous fetch".into(),
            rank,
            world,
        });
    }
    let deadline = Instant::now() + timeout;
    let mut backoff = Duration::from_millis(20);
    let mut last: String;
    loop {
        match try_fetch(host, port, rank, world, deadline) {
            Ok(p) => return Ok(p),
            Err(e @ CommError::Rendezvous(_)) => return Err(e),
            Err(e) => last = e.to_string(),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(CommError::Timeout {
                what: format!(
                    "rank 0's rendezvous server at {host}:{port} (rank {rank}; last error: {last})"
                ),
                secs: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(backoff.min(deadline - now));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

fn try_fetch(
    host: &str,
    port: u16,
    rank: usize,
    world: usize,
    deadline: Instant,
) -> Result<Vec<u8>> {
    let io = |what: &str| {
        let what = format!("{what} ({host}:{port})");
        move |e| CommError::io(what, e)
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let mut stream = None;
    let mut err = None;
    for addr in resolve(host, port)? {
        match TcpStream::connect_timeout(&addr, left().min(Duration::from_secs(2))) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => err = Some(e),
        }
    }
    let mut s = match (stream, err) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(io("connecting to the rendezvous server")(e)),
        (None, None) => {
            return Err(CommError::Rendezvous(format!(
                "`{host}` resolves to no address"
            )))
        }
    };
    s.set_read_timeout(Some(left()))
        .map_err(io("configuring the rendezvous connection"))?;
    s.set_write_timeout(Some(left()))
        .map_err(io("configuring the rendezvous connection"))?;
    let mut hello = Vec::with_capacity(16);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(world as u32).to_le_bytes());
    s.write_all(&hello)
        .map_err(io("sending the rendezvous hello"))?;
    let mut head = [0u8; 13];
    s.read_exact(&mut head)
        .map_err(io("reading the rendezvous answer"))?;
    if &head[..8] != MAGIC {
        return Err(CommError::Rendezvous(format!(
            "{host}:{port} is not an fpdt rendezvous server (it answered {:?})",
            String::from_utf8_lossy(&head[..8])
        )));
    }
    let len = u32::from_le_bytes([head[9], head[10], head[11], head[12]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(CommError::Rendezvous(format!(
            "the server announced {len} bytes, over the limit of {MAX_PAYLOAD}"
        )));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(io("reading the rendezvous payload"))?;
    if head[8] != 0 {
        return Err(CommError::Rendezvous(format!(
            "rank 0 refused rank {rank}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<RendezvousEnv> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RendezvousEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29400"),
        ])
        .unwrap();
        assert_eq!(
            e,
            RendezvousEnv {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                master_addr: "node0".into(),
                master_port: 29400,
                launcher: Launcher::Torchrun,
            }
        );
    }

    #[test]
    fn slurm_variables_with_the_default_port() {
        let e = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "16"),
            ("SLURM_LOCALID", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 16, 1));
        assert_eq!((e.master_port, e.launcher), (DEFAULT_PORT, Launcher::Slurm));
    }

    #[test]
    fn bad_environments_name_the_variable_and_the_rule() {
        let e = env(&[]).unwrap_err().to_string();
        assert!(e.contains("RANK") && e.contains("SLURM_PROCID"), "{e}");
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("RANK=\"x\"") && e.contains("non-negative integer"),
            "{e}"
        );
        let e = env(&[
            ("RANK", "4"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap_err();
        assert!(
            matches!(
                e,
                CommError::RankOutOfRange {
                    rank: 4,
                    world: 4,
                    ..
                }
            ),
            "{e}"
        );
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "a")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_PORT"), "{e}");
        let e = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "70000"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("1..=65535"), "{e}");
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("WORLD_SIZE") && e.contains("at least 1"), "{e}");
        let e = env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
    }
}
