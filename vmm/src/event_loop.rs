//! The VMM thread's event loop (event-manager): waits for the guest to end (or a stop signal)
//! and serves console input meanwhile.

use std::sync::{Arc, Mutex};

use devices::legacy::ExitSignal;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::console::ConsoleInput;
use crate::signals::StopSignals;

#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("{0:?}")]
    Manager(event_manager::Error),
}

/// Drains the exit eventfd; `ExitSignal` already holds the reason.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            log::error!("cannot watch the exit eventfd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Runs until a device, a vCPU or a stop signal has asked the guest to end.
pub fn run(
    exit: &Arc<ExitSignal>,
    console: Option<ConsoleInput>,
    stop: StopSignals,
) -> Result<(), EventLoopError> {
    let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Manager)?;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    manager.add_subscriber(Arc::new(Mutex::new(stop)));
    if let Some(console) = console {
        manager.add_subscriber(Arc::new(Mutex::new(console)));
    }
    while exit.reason().is_none() {
        manager.run().map_err(EventLoopError::Manager)?;
    }
    Ok(())
}
