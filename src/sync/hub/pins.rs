//! Pins and tickets: what keeps an object (or a parked pipe end) alive until its
//! receiver has it.

use super::*;

/// Keeps what a serialized handle refers to alive; dropping it lets go.
pub(crate) enum Pin {
    /// An object, for a child that receives it as an argument.
    Obj(#[allow(dead_code)] Obj),
    /// A parked pipe end (id and key; id 0 once kept for good).
    Export(u64, u64),
    /// A ticket of object `.1` (ticket 0 once kept until the copy is decoded).
    Ticket(u64, u64),
}

impl Pin {
    /// Lets it outlive its carrier: an object's ticket stays until its copy is decoded,
    /// a parked pipe end until it is claimed. (An object pinned for a child's arguments
    /// is let go, as before.)
    fn keep(mut self) {
        match &mut self {
            Pin::Export(id, _) | Pin::Ticket(id, _) => *id = 0,
            Pin::Obj(_) => {}
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let Some(h) = own() else {
            return;
        };
        match *self {
            // Unclaimed: closing it lets the other end see EOF.
            Pin::Export(id, key) if id != 0 => drop(h.take_export(id, key)),
            Pin::Ticket(ticket, obj) if ticket != 0 => h.unpin(ticket, obj),
            _ => {}
        }
    }
}

/// The pins taken while encoding one set of arguments, held until the child that
/// receives them is done with them.
#[derive(Default)]
pub(crate) struct Pins(Vec<Pin>);

impl std::fmt::Debug for Pins {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pins({})", self.0.len())
    }
}

impl Pins {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Held while the bytes are on their way: kept (see [`keep`](Self::keep)) unless
    /// [`UntilDecoded::refused`] says they will never be decoded, also if the sending
    /// future is dropped midway (the bytes may have gone).
    pub(crate) fn until_decoded(self) -> UntilDecoded {
        UntilDecoded(Some(self))
    }

    /// The bytes were sent (a put or a pipe message that succeeded): what they refer to
    /// stays until a process decodes them (a ticket is given back by its `Unpin`, a pipe
    /// end by its claim). Dropping `Pins` instead (the send failed) lets go at once.
    pub(crate) fn keep(self) {
        self.0.into_iter().for_each(Pin::keep);
    }
}

/// Pins of bytes on their way (see [`Pins::until_decoded`]).
pub(crate) struct UntilDecoded(Option<Pins>);

impl UntilDecoded {
    /// The bytes were certainly not delivered (refused, never sent, or their receiver
    /// is gone): let go of what they refer to now.
    pub(crate) fn refused(mut self) {
        drop(self.0.take());
    }
}

impl Drop for UntilDecoded {
    fn drop(&mut self) {
        if let Some(pins) = self.0.take() {
            pins.keep();
        }
    }
}

/// How many pins this thread's collects have taken so far: cheap enough to read around
/// every item of a map.
#[inline]
pub(crate) fn pins_taken() -> usize {
    TAKEN.with(std::cell::Cell::get)
}

/// Lets go of the last `n` pins the current [`collect`] took.
pub(crate) fn unpin_last(n: usize) {
    let dropped = COLLECTOR.with(|c| {
        c.borrow_mut()
            .as_mut()
            .map(|(_, v)| v.split_off(v.len().saturating_sub(n)))
    });
    // Dropped outside the borrow: a pin's drop may touch the hub.
    drop(dropped);
}

/// What the handles serialized by the current encoding are for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Carrier {
    /// A child's arguments: pinned until that child is done ([`collect`]).
    Args,
    /// A queue item or a pipe message: ticketed, and given back if it is not sent
    /// ([`collect_sent`]).
    Sent,
}

thread_local! {
    static COLLECTOR: std::cell::RefCell<Option<(Carrier, Vec<Pin>)>> =
        const { std::cell::RefCell::new(None) };
    static TAKEN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

pub(super) fn collect_as<R>(carrier: Carrier, f: impl FnOnce() -> R) -> (R, Pins) {
    /// Puts the outer collector back, also if `f` unwinds (a user's `Serialize` that
    /// panics): the pins taken so far are dropped then.
    struct Restore(Option<Option<(Carrier, Vec<Pin>)>>);
    impl Restore {
        fn finish(&mut self) -> Vec<Pin> {
            let outer = self.0.take().unwrap_or_default();
            let mine = COLLECTOR.with(|c| std::mem::replace(&mut *c.borrow_mut(), outer));
            mine.map(|(_, v)| v).unwrap_or_default()
        }
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            if self.0.is_some() {
                // Dropped outside the borrow (a pin's drop may touch the hub).
                drop(self.finish());
            }
        }
    }
    let outer = COLLECTOR.with(|c| c.borrow_mut().replace((carrier, Vec::new())));
    let mut restore = Restore(Some(outer));
    let r = f();
    let pins = restore.finish();
    (r, Pins(pins))
}

/// Runs `f` (an encoding of a child's arguments) and returns the pins taken by the
/// handles it serialized: they keep the objects alive until the child is done.
pub(crate) fn collect<R>(f: impl FnOnce() -> R) -> (R, Pins) {
    collect_as(Carrier::Args, f)
}

/// Runs `f` (an encoding of a queue item or a pipe message). Call [`Pins::keep`] once
/// the bytes are sent, or drop the pins if they are not.
pub(crate) fn collect_sent<R>(f: impl FnOnce() -> R) -> (R, Pins) {
    collect_as(Carrier::Sent, f)
}

/// Adds `pin` to the current encoding's; false if there is none.
pub(super) fn add_pin(pin: Pin) -> Result<(), Pin> {
    COLLECTOR.with(|c| match c.borrow_mut().as_mut() {
        Some((_, v)) => {
            v.push(pin);
            TAKEN.with(|t| t.set(t.get() + 1));
            Ok(())
        }
        None => Err(pin),
    })
}

/// Keeps a parked pipe end until the current encoding's carrier lets go of it, or, with
/// no carrier, until it is claimed.
/// Parks a duplicate of `fd` (`what` it is, for the error) in this process's hub for
/// the process that decodes the handle being serialized, kept until then (see
/// [`pin_export`]): the hub, the export's number and its key, to write in the handle.
pub(crate) fn export_for_handle(
    fd: std::os::fd::BorrowedFd<'_>,
    what: &str,
) -> Result<(super::HubRef, u64, u64), String> {
    let dup = fd
        .try_clone_to_owned()
        .map_err(|e| format!("cannot duplicate {what}: {e}"))?;
    let hub = super::hub()?;
    let (export, key) = hub.export(dup)?;
    pin_export(export, key);
    Ok((hub.me.clone(), export, key))
}

pub(crate) fn pin_export(id: u64, key: u64) {
    if let Err(pin) = add_pin(Pin::Export(id, key)) {
        pin.keep();
    }
}

/// Keeps object `obj` (id `id`) alive for the handle being serialized, and returns the
/// ticket to write with it (0 for a child's arguments, which pin it instead).
pub(crate) fn pin_handle(hub: &Hub, id: u64, obj: Obj) -> u64 {
    let carrier = COLLECTOR.with(|c| c.borrow().as_ref().map(|(k, _)| *k));
    if carrier == Some(Carrier::Args) {
        // Pushed outside any borrow: a pin's drop may touch the hub.
        if add_pin(Pin::Obj(obj)).is_err() {
            unreachable!("a collector is installed");
        }
        return 0;
    }
    let ticket = hub.pin_ticket(id, obj);
    if carrier == Some(Carrier::Sent) && add_pin(Pin::Ticket(ticket, id)).is_err() {
        unreachable!("a collector is installed");
    }
    ticket
}
