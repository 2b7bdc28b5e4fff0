//! The discovery stream from a pool to its balancer, holding only the
//! latest change of each backend.
//!
//! tower's balancer reads its discovery stream only when a call arrives.
//! Through a plain channel, an idle coordinator whose backends come and go
//! (servers registering in etcd as they restart) would queue every change
//! it was sent, without bound, until the next call. A backend's latest
//! change says all the balancer needs (an insert replaces the service it
//! had for that backend, a removal removes whatever it had), so each new
//! change replaces the one still waiting for its backend, and the removal
//! of a backend the balancer never got cancels its insert instead: what
//! waits is at most one change per backend the pool holds, or the
//! balancer does.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use tower::discover::Change;

use crate::backend::Backend;
use crate::lock;

/// One change to the balancer's set of backends, by URL.
pub type BackendChange = Change<String, Backend>;

/// A new pair of ends: the pool's sender, the balancer's stream.
pub(crate) fn channel() -> (ChangeSender, Discovery) {
    let shared = Arc::new(Shared::default());
    (
        ChangeSender {
            shared: shared.clone(),
        },
        Discovery { shared },
    )
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    reader: AtomicWaker,
}

#[derive(Default)]
struct Waiting {
    by_url: BTreeMap<String, BackendChange>,
    /// The backends the balancer has (inserted, and not removed since).
    handed: BTreeSet<String>,
    sender_gone: bool,
    reader_gone: bool,
}

/// The pool's end.
pub(crate) struct ChangeSender {
    shared: Arc<Shared>,
}

impl ChangeSender {
    /// Queues `change` in place of any change still waiting for its
    /// backend (a removal the balancer needs not know of only drops that);
    /// `false` if the balancer is gone.
    pub(crate) fn send(&self, change: BackendChange) -> bool {
        let url = match &change {
            Change::Insert(url, _) | Change::Remove(url) => url.clone(),
        };
        let replaced = {
            let mut waiting = lock(&self.shared.waiting);
            if waiting.reader_gone {
                return false;
            }
            if matches!(change, Change::Remove(_)) && !waiting.handed.contains(&url) {
                waiting.by_url.remove(&url)
            } else {
                waiting.by_url.insert(url, change)
            }
        };
        // A replaced backend's service goes outside the lock.
        drop(replaced);
        self.shared.reader.wake();
        true
    }
}

impl Drop for ChangeSender {
    fn drop(&mut self) {
        lock(&self.shared.waiting).sender_gone = true;
        self.shared.reader.wake();
    }
}

/// The balancer's end: a `tower::discover` stream, which ends once the
/// pool is gone and every change is read.
pub struct Discovery {
    shared: Arc<Shared>,
}

impl Stream for Discovery {
    type Item = Result<BackendChange, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.shared.reader.register(cx.waker());
        let mut waiting = lock(&self.shared.waiting);
        match waiting.by_url.pop_first() {
            Some((url, change)) => {
                match &change {
                    Change::Insert(..) => waiting.handed.insert(url),
                    Change::Remove(_) => waiting.handed.remove(&url),
                };
                Poll::Ready(Some(Ok(change)))
            }
            None if waiting.sender_gone => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        let left = {
            let mut waiting = lock(&self.shared.waiting);
            waiting.reader_gone = true;
            std::mem::take(&mut waiting.by_url)
        };
        drop(left);
    }
}
