//! A handler that does nothing: the sandbox benchmark's baseline.

use ordo_guest::{export_handler, Handler, HandlerError, Message};

struct Noop;

impl Handler for Noop {
    fn handle(_msg: Message) -> Result<(), HandlerError> {
        Ok(())
    }
}

export_handler!(Noop);
