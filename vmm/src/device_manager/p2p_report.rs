//! The P2P table, visible: logged at info once the guest's BAR changes settle (after it has
//! enumerated its devices, and after each later move, decode toggle or reset), never once per
//! config write: Linux toggles decoding around every BAR it sizes.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_p2p::{P2pMechanism, P2pRow, P2pTable};

use crate::seccomp::ThreadKind;

/// How long the BARs must stay still before the table is logged.
const SETTLE: Duration = Duration::from_millis(500);

#[derive(Default)]
struct State {
    /// When the last unreported change happened.
    changed: Option<Instant>,
    stop: bool,
}

struct Shared {
    tables: Vec<Arc<P2pTable>>,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn rows(&self) -> Vec<P2pRow> {
        self.tables.iter().flat_map(|t| t.rows()).collect()
    }
}

/// The rows as the API serves them (`GET vm.p2p`) and as the log and `p2pvmm remote p2p` show
/// them: one conversion, one text form.
pub fn api_table(rows: Vec<P2pRow>) -> api::P2pTable {
    let rows = rows
        .into_iter()
        .map(|row| api::P2pTableRow {
            group: row.domain,
            device: row.device_id,
            host_bdf: row.host_bdf.to_string(),
            bar: u8::try_from(row.bar).unwrap_or(u8::MAX),
            area_offset: row.area_offset,
            size: row.size,
            guest_start: row.guest.map(|(start, _)| start),
            mechanism: match row.mechanism {
                P2pMechanism::Dmabuf => "dmabuf",
                P2pMechanism::Legacy => "legacy",
            }
            .to_owned(),
            state: row.state.to_string(),
        })
        .collect();
    api::P2pTable { rows }
}

/// Logs the P2P tables of every domain after changes; [`changed`](Self::changed) is cheap and
/// safe to call from vCPU threads.
pub struct P2pReporter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl P2pReporter {
    /// A reporter over `tables`; spawns its thread only when there is a table to show.
    pub fn new(tables: Vec<Arc<P2pTable>>) -> Self {
        let shared = Arc::new(Shared {
            tables,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        let thread = if shared.tables.is_empty() {
            None
        } else {
            let shared = shared.clone();
            let builder = std::thread::Builder::new().name("p2p-report".into());
            crate::seccomp::spawn(ThreadKind::P2pReport, builder, move || report_loop(&shared))
                .inspect_err(|e| log::warn!("P2P table reporter not started: {e}"))
                .ok()
        };
        Self { shared, thread }
    }

    /// Every table's rows, for the API.
    pub fn rows(&self) -> Vec<P2pRow> {
        self.shared.rows()
    }

    /// A BAR placement or decode state changed: log the table once things settle.
    pub fn changed(&self) {
        let mut state = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.changed = Some(Instant::now());
        self.shared.wake.notify_one();
    }
}

fn report_loop(shared: &Shared) {
    let mut state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        if state.stop {
            return;
        }
        match state.changed {
            None => {
                state = shared
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            Some(at) if at.elapsed() >= SETTLE => {
                state.changed = None;
                drop(state);
                crate::panics::maybe_panic(crate::panics::PanicPoint::P2pReport);
                let table = api::format_table(&api_table(shared.rows()));
                log::info!("P2P table:\n{table}");
                state = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
            }
            Some(at) => {
                let left = SETTLE.saturating_sub(at.elapsed());
                state = shared
                    .wake
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
    }
}

impl Drop for P2pReporter {
    fn drop(&mut self) {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
