//! The VMM thread's event loop (event-manager): waits for the guest to end and serves console
//! input meanwhile.

use std::sync::{Arc, Mutex};

use devices::legacy::ExitSignal;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::console::ConsoleInput;

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

/// Runs until a device or vCPU has asked the guest to end.
pub fn run(exit: &Arc<ExitSignal>, console: Option<ConsoleInput>) -> Result<(), EventLoopError> {
    let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Manager)?;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    if let Some(console) = console {
        manager.add_subscriber(Arc::new(Mutex::new(console)));
    }
    while exit.reason().is_none() {
        manager.run().map_err(EventLoopError::Manager)?;
    }
    Ok(())
}
