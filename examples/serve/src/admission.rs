//! Admission control: the most requests the service holds at once, counted
//! from before a request's body is read until its answer is written, so a
//! flood of clients costs a 503 each, not a body, a decoded tensor and a
//! place in the queue each.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A counter of admitted requests with a capacity.
#[derive(Debug)]
pub struct Admission {
    capacity: usize,
    admitted: AtomicUsize,
}

/// One admitted request's place; dropping it (answer written, client gone,
/// error) gives the place back.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// Admits at most `capacity` requests at once (at least one).
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            admitted: AtomicUsize::new(0),
        })
    }

    /// A place for one more request, or `None` when all are taken.
    pub fn try_admit(self: &Arc<Self>) -> Option<Ticket> {
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .ok()
            .map(|_| Ticket {
                admission: Arc::clone(self),
            })
    }

    /// Requests admitted now.
    pub fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Acquire)
    }

    /// The most requests admitted at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Places run out at the capacity and come back when tickets drop.
    #[test]
    fn admits_up_to_capacity_and_releases() {
        let admission = Admission::new(2);
        let a = admission.try_admit().expect("first");
        let b = admission.try_admit().expect("second");
        assert!(admission.try_admit().is_none());
        assert_eq!(admission.admitted(), 2);
        drop(a);
        let c = admission.try_admit().expect("a place came back");
        drop((b, c));
        assert_eq!(admission.admitted(), 0);
    }

    /// Concurrent admissions never exceed the capacity.
    #[test]
    fn concurrent_admissions_respect_capacity() {
        let admission = Admission::new(3);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        if let Some(ticket) = admission.try_admit() {
                            peak.fetch_max(admission.admitted(), Ordering::Relaxed);
                            drop(ticket);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 3);
        assert_eq!(admission.admitted(), 0);
    }
}
