//! Tracing: every enqueued operation, with its stream, kind, size, start and
//! end, written as a Chrome trace (JSON) that Perfetto and chrome://tracing
//! open.
//!
//! On the cpu device the times are wall-clock times measured by the stream
//! workers; on the meta device they are the cost model's predicted times, so
//! the same viewer shows a measured and a predicted step.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::{Result, RuntimeError};

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// A kernel or a host function standing in for one.
    Kernel,
    /// Host memory to device memory.
    CopyH2D,
    /// Device memory to host memory.
    CopyD2H,
    /// Device memory to device memory.
    CopyD2D,
    /// Host memory to host memory.
    CopyH2H,
    /// A collective communication operation.
    Collective,
}

impl OpKind {
    /// Every kind, in the order [`TraceTotals`] indexes them.
    pub const ALL: [OpKind; 6] = [
        OpKind::Kernel,
        OpKind::CopyH2D,
        OpKind::CopyD2H,
        OpKind::CopyD2D,
        OpKind::CopyH2H,
        OpKind::Collective,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// Whether the operation is a copy.
    pub fn is_copy(self) -> bool {
        matches!(
            self,
            OpKind::CopyH2D | OpKind::CopyD2H | OpKind::CopyD2D | OpKind::CopyH2H
        )
    }

    /// Short name used as the trace category.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Kernel => "kernel",
            OpKind::CopyH2D => "h2d",
            OpKind::CopyD2H => "d2h",
            OpKind::CopyD2D => "d2d",
            OpKind::CopyH2H => "h2h",
            OpKind::Collective => "collective",
        }
    }
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceEvent {
    /// The stream's name.
    pub stream: Arc<str>,
    /// The stream's number within its device.
    pub stream_id: u32,
    /// The operation's name (kernel name, "offload kv", ...).
    pub name: Cow<'static, str>,
    /// What it does.
    pub kind: OpKind,
    /// Bytes moved (copies, collectives) or touched (kernels).
    pub bytes: u64,
    /// Floating-point operations (kernels).
    pub flops: f64,
    /// Start, in nanoseconds since the device was created (measured on cpu,
    /// predicted on meta).
    pub start_ns: u64,
    /// End, in the same clock.
    pub end_ns: u64,
}

impl TraceEvent {
    /// Duration in nanoseconds.
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// What the operations of one kind added up to.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KindTotal {
    /// Operations.
    pub count: u64,
    /// Their durations, summed (overlaps counted twice), ns.
    pub busy_ns: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Their floating-point operations.
    pub flops: f64,
}

/// Running totals per [`OpKind`] of everything a trace saw, kept whether or
/// not events are recorded: what a long step needs (busy time per stream
/// kind, FLOPs executed) in constant memory, where its events would not fit
/// (a planned 4M-token step enqueues hundreds of millions of operations).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TraceTotals {
    kinds: [KindTotal; 6],
}

impl TraceTotals {
    /// The totals of `kind`.
    pub fn of(&self, kind: OpKind) -> KindTotal {
        self.kinds[kind.index()]
    }

    fn add(&mut self, ev: &TraceEvent) {
        let t = &mut self.kinds[ev.kind.index()];
        t.count += 1;
        t.busy_ns += ev.duration_ns();
        t.bytes += ev.bytes;
        t.flops += ev.flops;
    }
}

/// The trace of one device. Recording events can be switched off (it is on
/// by default); the totals are always kept.
#[derive(Debug)]
pub struct Trace {
    device: String,
    enabled: AtomicBool,
    events: Mutex<Vec<TraceEvent>>,
    totals: Mutex<TraceTotals>,
}

impl Trace {
    pub(crate) fn new(device: String) -> Self {
        Trace {
            device,
            enabled: AtomicBool::new(true),
            events: Mutex::new(Vec::new()),
            totals: Mutex::new(TraceTotals::default()),
        }
    }

    /// Turns recording events on or off (the totals are kept either way).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// Whether recording is on.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub(crate) fn record(&self, ev: TraceEvent) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(&ev);
        if self.is_enabled() {
            self.lock().push(ev);
        }
    }

    /// The totals per kind of every operation since the last
    /// [`Trace::clear`], recorded as events or not.
    pub fn totals(&self) -> TraceTotals {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<TraceEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the events recorded so far, in completion order per stream.
    pub fn events(&self) -> Vec<TraceEvent> {
        self.lock().clone()
    }

    /// Forgets the events recorded so far, and the totals.
    pub fn clear(&self) {
        self.lock().clear();
        *self.totals.lock().unwrap_or_else(|e| e.into_inner()) = TraceTotals::default();
    }

    /// The device's name, used as the process name in Chrome traces.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Writes this trace as a Chrome trace JSON file.
    pub fn write_chrome(&self, path: &Path) -> Result<()> {
        write_chrome_trace(&[self], path)
    }
}

/// Renders several devices' traces (one process each, one thread per stream)
/// as Chrome trace JSON.
pub fn chrome_trace_json(traces: &[&Trace]) -> String {
    use serde_json::json;
    let mut all = Vec::new();
    for (pid, t) in traces.iter().enumerate() {
        all.push(
            json!({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                        "args": {"name": t.device()}}),
        );
        let events = t.events();
        let mut named = std::collections::BTreeMap::new();
        for e in &events {
            named.entry(e.stream_id).or_insert_with(|| e.stream.clone());
        }
        for (tid, name) in named {
            all.push(
                json!({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                            "args": {"name": name.as_ref()}}),
            );
        }
        for e in &events {
            all.push(json!({
                "name": e.name, "cat": e.kind.as_str(), "ph": "X",
                "ts": e.start_ns as f64 / 1e3, "dur": e.duration_ns() as f64 / 1e3,
                "pid": pid, "tid": e.stream_id,
                "args": {"bytes": e.bytes, "flops": e.flops},
            }));
        }
    }
    json!({ "traceEvents": all, "displayTimeUnit": "ms" }).to_string()
}

/// Writes several devices' traces to one Chrome trace JSON file.
pub fn write_chrome_trace(traces: &[&Trace], path: &Path) -> Result<()> {
    let json = chrome_trace_json(traces);
    let io = |source| RuntimeError::Io {
        what: format!("writing trace {}", path.display()),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(json.as_bytes()).map_err(io)?;
    Ok(())
}

/// The events' intervals, sorted and merged where they touch or overlap.
fn merged(evs: &[&TraceEvent]) -> Vec<(u64, u64)> {
    let mut iv: Vec<(u64, u64)> = evs.iter().map(|e| (e.start_ns, e.end_ns)).collect();
    iv.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in iv {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Total time in nanoseconds during which at least one of `evs` ran (the
/// union of their intervals): a stream's busy time.
pub fn busy_ns(evs: &[&TraceEvent]) -> u64 {
    merged(evs).iter().map(|(s, e)| e - s).sum()
}

/// Total time in nanoseconds during which at least one event of `a` and one
/// event of `b` ran at the same time: the overlap a trace proves.
pub fn overlap_ns(a: &[&TraceEvent], b: &[&TraceEvent]) -> u64 {
    let (a, b) = (merged(a), merged(b));
    let (mut i, mut j, mut total) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if e > s {
            total += e - s;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(start_ns: u64, end_ns: u64) -> TraceEvent {
        TraceEvent {
            stream: Arc::from("s"),
            stream_id: 0,
            name: Cow::Borrowed("op"),
            kind: OpKind::Kernel,
            bytes: 0,
            flops: 0.0,
            start_ns,
            end_ns,
        }
    }

    #[test]
    fn busy_time_is_the_union_and_overlap_the_intersection() {
        let a = [ev(0, 10), ev(5, 20), ev(30, 40)];
        let b = [ev(15, 35)];
        let (ra, rb): (Vec<_>, Vec<_>) = (a.iter().collect(), b.iter().collect());
        assert_eq!(busy_ns(&ra), 30);
        assert_eq!(busy_ns(&rb), 20);
        assert_eq!(busy_ns(&[]), 0);
        assert_eq!(overlap_ns(&ra, &rb), 10);
    }

    #[test]
    fn totals_add_up_the_events_whether_recorded_or_not() {
        for (i, k) in OpKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i, "{k:?}");
        }
        let t = Trace::new("d".into());
        let copy = TraceEvent {
            kind: OpKind::CopyH2D,
            bytes: 64,
            ..ev(5, 12)
        };
        t.record(TraceEvent {
            flops: 3.0,
            bytes: 8,
            ..ev(0, 10)
        });
        t.set_enabled(false);
        t.record(TraceEvent {
            flops: 4.0,
            ..ev(10, 30)
        });
        t.record(copy);
        assert_eq!(t.events().len(), 1, "only the first was recorded");
        let k = t.totals().of(OpKind::Kernel);
        assert_eq!((k.count, k.busy_ns, k.bytes, k.flops), (2, 30, 8, 7.0));
        let c = t.totals().of(OpKind::CopyH2D);
        assert_eq!((c.count, c.busy_ns, c.bytes), (1, 7, 64));
        assert_eq!(t.totals().of(OpKind::Collective), KindTotal::default());
        t.clear();
        assert_eq!(t.totals(), TraceTotals::default());
    }
}
