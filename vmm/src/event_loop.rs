//! The VMM thread's event loop (event-manager): waits for the guest to end, a stop signal or an
//! API request, and serves console input meanwhile.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::ExitSignal;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::console::ConsoleInput;
use crate::signals::StopSignals;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("{0:?}")]
    Manager(event_manager::Error),
    #[error("duplicating the {what} eventfd: {source}")]
    Clone {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn watch(
    event: &EventFd,
    fired: &Arc<AtomicBool>,
    what: &'static str,
) -> Result<Subscriber, EventLoopError> {
    let event = event
        .try_clone()
        .map_err(|source| EventLoopError::Clone { what, source })?;
    Ok(Arc::new(Mutex::new(Wake {
        event,
        fired: fired.clone(),
        what,
    })))
}

/// Drains an eventfd whose meaning is kept elsewhere (`ExitSignal` holds the reason, the API
/// channel holds the requests) and records that it fired.
struct Wake {
    event: EventFd,
    fired: Arc<AtomicBool>,
    what: &'static str,
}

impl MutEventSubscriber for Wake {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.event, EventSet::IN)) {
            log::error!("cannot watch the {} eventfd: {e:?}", self.what);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.fired.store(true, Ordering::Release);
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The loop's sources; [`EventLoop::wait`] returns after each batch of events.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    api: Arc<AtomicBool>,
}

impl EventLoop {
    /// Watches `exit`, the stop signals, the console (if any) and `wakes` (clones of them: the
    /// API channel's eventfd, the hotplug eject queue's).
    pub fn new(
        exit: &Arc<ExitSignal>,
        console: Option<ConsoleInput>,
        stop: StopSignals,
        wakes: &[&EventFd],
    ) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Manager)?;
        manager.add_subscriber(watch(exit.event(), &Arc::default(), "exit")?);
        manager.add_subscriber(Arc::new(Mutex::new(stop)));
        if let Some(console) = console {
            manager.add_subscriber(Arc::new(Mutex::new(console)));
        }
        let fired = Arc::new(AtomicBool::new(false));
        for event in wakes {
            manager.add_subscriber(watch(event, &fired, "wake")?);
        }
        Ok(Self {
            manager,
            api: fired,
        })
    }

    /// Waits for and handles one batch of events; returns whether one of `wakes` fired.
    pub fn wait(&mut self) -> Result<bool, EventLoopError> {
        self.wait_at_most(None)
    }

    /// [`wait`](Self::wait), returning after `timeout` at the latest (`None`: no limit).
    pub fn wait_at_most(&mut self, timeout: Option<Duration>) -> Result<bool, EventLoopError> {
        match timeout {
            None => self.manager.run(),
            Some(t) => self
                .manager
                .run_with_timeout(i32::try_from(t.as_millis()).unwrap_or(i32::MAX)),
        }
        .map_err(EventLoopError::Manager)?;
        Ok(self.api.swap(false, Ordering::AcqRel))
    }
}
