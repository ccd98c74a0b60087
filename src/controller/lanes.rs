//! The API client's limit on requests in flight, with a lane that goes ahead of the queue.
//!
//! In a burst, the writes a launch waits on (each member's launch record, stored before the
//! EC2 call) queue behind the writes of launches already sent: their Booting statuses and
//! their Events. A request marked [`Ahead`] takes the next free place before any unmarked one
//! waiting; among themselves, each lane is first come, first served. Nothing is dropped or
//! reordered beyond that: an unmarked request waits longer than it would have only while
//! marked ones are queued, which a burst's launch records are for a moment.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::http::Request;
use futures::future::BoxFuture;
use tokio::sync::oneshot;

/// A request extension: the request takes the next free place before unmarked ones.
#[derive(Clone, Copy, Debug)]
pub struct Ahead;

/// At most `limit` requests of the wrapped service in flight; see the module's comment.
#[derive(Clone)]
pub struct LanesLayer(Arc<Lanes>);

impl LanesLayer {
    pub fn new(limit: usize) -> Self {
        assert!(
            limit > 0,
            "a limit of no requests in flight would send none"
        );
        Self(Arc::new(Lanes {
            limit,
            state: Mutex::default(),
        }))
    }
}

impl<S> tower::Layer<S> for LanesLayer {
    type Service = Limited<S>;

    fn layer(&self, inner: S) -> Limited<S> {
        Limited {
            inner,
            lanes: self.0.clone(),
        }
    }
}

/// The service [`LanesLayer`] makes: `inner`, with its requests waiting for a place.
pub struct Limited<S> {
    inner: S,
    lanes: Arc<Lanes>,
}

impl<S, B> tower::Service<Request<B>> for Limited<S>
where
    S: tower::Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    /// The request is handed to the inner service at once and sent when it has a place: kube's
    /// stack connects and sends only when its future is polled, though its trace span (and
    /// the span's latency) starts at the call, so it includes the wait for a place. The place
    /// is held until the answer's head arrives, so a watch holds one only until its stream
    /// starts.
    fn call(&mut self, request: Request<B>) -> Self::Future {
        let ahead = request.extensions().get::<Ahead>().is_some();
        let lanes = self.lanes.clone();
        let sent = self.inner.call(request);
        Box::pin(async move {
            let _place = lanes.place(ahead).await;
            sent.await
        })
    }
}

struct Lanes {
    limit: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_flight: usize,
    /// Requests waiting for a place: marked [`Ahead`], then the rest. Only while all places
    /// are taken; a freed place goes to the first of them rather than back to the count.
    ahead: VecDeque<oneshot::Sender<Place>>,
    rest: VecDeque<oneshot::Sender<Place>>,
}

/// One of the `limit` places, given to the next waiting request when dropped. (`None` only for
/// a place whose request was given up before it arrived: the place went on to another.)
struct Place(Option<Arc<Lanes>>);

impl Lanes {
    async fn place(self: Arc<Self>, ahead: bool) -> Place {
        let wait = {
            let mut state = self.state.lock().unwrap();
            if state.in_flight < self.limit {
                state.in_flight += 1;
                drop(state);
                return Place(Some(self));
            }
            let (give, wait) = oneshot::channel();
            let lane = if ahead {
                &mut state.ahead
            } else {
                &mut state.rest
            };
            lane.push_back(give);
            wait
        };
        // A waiter's sender is dropped only once its place is sent, or once its receiver is
        // gone; while this receiver waits, the place comes.
        wait.await.expect("a waiting request is given a place")
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let Some(lanes) = self.0.take() else { return };
        loop {
            let next = {
                let mut state = lanes.state.lock().unwrap();
                match (state.ahead.pop_front()).or_else(|| state.rest.pop_front()) {
                    Some(next) => next,
                    None => {
                        state.in_flight -= 1;
                        return;
                    }
                }
            };
            // Sent with the lock released: a place that cannot be delivered is dropped here,
            // and its drop takes the lock. Until it arrives it stays counted in flight.
            match next.send(Place(Some(lanes.clone()))) {
                Ok(()) => return,
                // That request was given up while it waited: the place goes to the next.
                Err(mut place) => place.0 = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt as _;

    fn lanes(limit: usize) -> Arc<Lanes> {
        LanesLayer::new(limit).0
    }

    /// Polls `future` once: whether it is still waiting.
    fn waits<F: std::future::Future + Unpin>(future: &mut F) -> bool {
        future.now_or_never().is_none()
    }

    #[tokio::test]
    async fn a_freed_place_goes_to_a_request_marked_ahead_before_one_waiting_longer() {
        let lanes = lanes(1);
        let taken = lanes.clone().place(false).await;
        let mut rest = Box::pin(lanes.clone().place(false));
        assert!(waits(&mut rest), "the only place is taken");
        let mut ahead = Box::pin(lanes.clone().place(true));
        assert!(waits(&mut ahead));
        drop(taken);
        assert!(waits(&mut rest), "the marked request goes first");
        let place = ahead.now_or_never().expect("the freed place went ahead");
        drop(place);
        let place = rest.now_or_never().expect("then the one waiting longer");
        drop(place);
        assert_eq!(lanes.state.lock().unwrap().in_flight, 0);
    }

    #[tokio::test]
    async fn a_request_given_up_while_waiting_loses_no_place() {
        let lanes = lanes(2);
        let first = lanes.clone().place(false).await;
        let second = lanes.clone().place(true).await;
        let mut given_up = Box::pin(lanes.clone().place(true));
        assert!(waits(&mut given_up), "both places are taken");
        let mut waiting = Box::pin(lanes.clone().place(false));
        assert!(waits(&mut waiting));
        drop(given_up);
        drop(first);
        assert!(
            waiting.now_or_never().is_some(),
            "the freed place skipped the dropped one"
        );
        assert_eq!(
            lanes.state.lock().unwrap().in_flight,
            1,
            "the second's place is held"
        );
        drop(second);
        assert_eq!(lanes.state.lock().unwrap().in_flight, 0);
        assert_eq!(
            Arc::strong_count(&lanes),
            1,
            "no place still holds the lanes"
        );
    }

    #[tokio::test]
    async fn a_place_sent_to_a_request_given_up_before_it_arrived_is_freed() {
        let lanes = lanes(1);
        let first = lanes.clone().place(false).await;
        let mut waiting = Box::pin(lanes.clone().place(false));
        assert!(waits(&mut waiting));
        // The place is sent to the waiting request, which is dropped before it reads it.
        drop(first);
        drop(waiting);
        assert_eq!(lanes.state.lock().unwrap().in_flight, 0);
        assert_eq!(Arc::strong_count(&lanes), 1);
    }

    #[tokio::test]
    async fn through_the_layer_a_marked_request_is_sent_before_an_unmarked_one_waiting_longer() {
        use tower::{Layer as _, Service as _};
        let sent = Arc::new(Mutex::new(Vec::new()));
        // The first request sent waits for this before it is answered.
        let (answer, first_answered) = oneshot::channel::<()>();
        let first_answered = Mutex::new(Some(first_answered));
        let service = tower::service_fn({
            let sent = sent.clone();
            move |request: Request<&'static str>| {
                let sent = sent.clone();
                let gate = first_answered.lock().unwrap().take();
                async move {
                    sent.lock().unwrap().push(*request.body());
                    if let Some(gate) = gate {
                        let _ = gate.await;
                    }
                    Ok::<_, std::convert::Infallible>(())
                }
            }
        });
        let mut limited = LanesLayer::new(1).layer(service);
        let mut call = |body, ahead| {
            let mut request = Request::new(body);
            if ahead {
                request.extensions_mut().insert(Ahead);
            }
            limited.call(request)
        };
        let mut first = call("first", false);
        assert!(waits(&mut first), "sent, and waiting");
        let mut unmarked = call("unmarked", false);
        assert!(waits(&mut unmarked), "waiting for a place");
        let mut marked = call("marked", true);
        assert!(waits(&mut marked), "waiting for a place");
        answer.send(()).unwrap();
        first.await.unwrap();
        assert!(waits(&mut unmarked), "the marked one went first");
        marked.await.unwrap();
        unmarked.await.unwrap();
        assert_eq!(*sent.lock().unwrap(), ["first", "marked", "unmarked"]);
    }

    #[tokio::test]
    async fn places_are_counted_back_when_nobody_waits() {
        let lanes = lanes(2);
        let (a, b) = (
            lanes.clone().place(false).await,
            lanes.clone().place(true).await,
        );
        drop((a, b));
        assert_eq!(lanes.state.lock().unwrap().in_flight, 0);
        let _again = [
            lanes.clone().place(false).await,
            lanes.clone().place(false).await,
        ];
        assert_eq!(lanes.state.lock().unwrap().in_flight, 2);
    }
}
