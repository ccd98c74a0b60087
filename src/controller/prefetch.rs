//! A paged list that asks for its next page while the last one is parsed.
//!
//! kube's watcher lists a page, parses it, and only then asks for the next: with thousands of
//! RunnerJobs the API server and Pacer take turns, each idle while the other works. The client
//! that [`client`] makes sends a page's request on to the API server as before, reads the
//! answer's continue token, and at once asks for the page after it, which the watcher's next
//! request then takes. Nothing else changes: every other request (the watch, a list without a
//! limit) goes straight through, a request for any other page drops the one fetched ahead, and a
//! page whose fetch ahead failed (in transit or answered with an error) is asked for again. A
//! continue token pins the list to one resourceVersion, so a page fetched early is the page the
//! API server would answer later.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::http::{Method, Request, Response, Uri};
use futures::future::BoxFuture;
use kube::client::Body;
use serde::Deserialize;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// A client that sends every request through `base`, fetching a paged list's next page ahead.
pub(super) fn client(base: kube::Client) -> kube::Client {
    let namespace = base.default_namespace().to_string();
    let prefetch = Prefetch {
        base,
        ahead: Arc::default(),
    };
    kube::Client::new(prefetch, namespace)
}

#[derive(Clone)]
struct Prefetch {
    base: kube::Client,
    /// The page fetched ahead, if any, with the request the watcher is expected to send for it.
    ahead: Arc<Mutex<Option<(Uri, Fetch)>>>,
}

/// An answer read to its last byte, with the request for the page after it: `None` on the last
/// page, or when the answer is not a page (an error).
struct Page {
    response: Response<Bytes>,
    next: Option<Uri>,
}

/// A page's fetch, stopped when dropped: by a request for another page, by the watcher's own
/// request given up while it waited for it, or with the client.
struct Fetch(JoinHandle<kube::Result<Page>>);

impl Drop for Fetch {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl tower::Service<Request<Body>> for Prefetch {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = BoxFuture<'static, kube::Result<Response<Body>>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // `base` has its own queue and limit.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.send(request).await })
    }
}

impl Prefetch {
    async fn send(self, request: Request<Body>) -> kube::Result<Response<Body>> {
        if !is_page(&request) {
            return self.base.send(request).await;
        }
        // Whatever was fetched ahead is taken: this page's, or another's, dropped here.
        let ahead = self.ahead.lock().unwrap().take();
        let fetched = match ahead {
            Some((uri, mut fetch)) if same_page(&uri, request.uri()) => {
                match (&mut fetch.0).await {
                    Ok(Ok(page)) if page.response.status().is_success() => Some(page),
                    // A failure, in transit or answered, is asked again now, when the watcher
                    // asks: an answer from a while ago may no longer hold.
                    _ => None,
                }
            }
            _ => None,
        };
        let headers = request.headers().clone();
        let extensions = request.extensions().clone();
        let page = match fetched {
            Some(page) => page,
            None => fetch(self.base.clone(), request).await?,
        };
        if let Some(next) = page.next.clone() {
            let mut request = Request::get(next.clone())
                .body(Body::empty())
                .expect("a GET of a valid URI");
            *request.headers_mut() = headers;
            *request.extensions_mut() = extensions;
            let fetch = fetch(self.base.clone(), request).in_current_span();
            *self.ahead.lock().unwrap() = Some((next, Fetch(tokio::spawn(fetch))));
        }
        Ok(page.response.map(Body::from))
    }
}

async fn fetch(base: kube::Client, request: Request<Body>) -> kube::Result<Page> {
    let uri = request.uri().clone();
    let (parts, body) = base.send(request).await?.into_parts();
    let bytes = body.collect_bytes().await?;
    // An error's body may carry a continue token too (a 410's): it is not followed.
    let next = parts
        .status
        .is_success()
        .then(|| next_page(&uri, &bytes))
        .flatten();
    Ok(Page {
        response: Response::from_parts(parts, bytes),
        next,
    })
}

/// A GET of one page of a list: it has a limit and is not a watch.
fn is_page(request: &Request<Body>) -> bool {
    let query = query(request.uri());
    let has = |key: &str| query.iter().any(|(k, _)| k == key);
    request.method() == Method::GET && has("limit") && !has("watch")
}

fn query(uri: &Uri) -> Vec<(String, String)> {
    form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

/// Whether two requests ask for the same page: one path, the same parameters in any order.
fn same_page(a: &Uri, b: &Uri) -> bool {
    let sorted = |uri: &Uri| {
        let mut pairs = query(uri);
        pairs.sort();
        pairs
    };
    a.path() == b.path() && sorted(a) == sorted(b)
}

/// The request for the page after `page`, the answer to `uri`; `None` on the last page.
fn next_page(uri: &Uri, page: &[u8]) -> Option<Uri> {
    // Only the list's metadata is read; the items are skipped unparsed.
    #[derive(Deserialize)]
    struct List {
        #[serde(default)]
        metadata: Meta,
    }
    #[derive(Default, Deserialize)]
    struct Meta {
        #[serde(default, rename = "continue")]
        next: Option<String>,
    }
    let token = serde_json::from_slice::<List>(page)
        .ok()?
        .metadata
        .next
        .filter(|t| !t.is_empty())?;
    let mut next = form_urlencoded::Serializer::new(String::new());
    for (k, v) in query(uri).iter().filter(|(k, _)| k != "continue") {
        next.append_pair(k, v);
    }
    next.append_pair("continue", &token);
    format!("{}?{}", uri.path(), next.finish()).parse().ok()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use futures::TryStreamExt;
    use kube::Api;
    use kube::runtime::watcher;
    use serde_json::json;

    use super::*;
    use crate::api::RunnerJob;

    /// An API server of `jobs` RunnerJobs in pages of two, whose continue tokens need escaping,
    /// and whose watch never answers. It records the page each request asks for.
    #[derive(Clone, Default)]
    struct Server {
        asked: Arc<Mutex<Vec<String>>>,
        jobs: usize,
        /// Pages answered once with this error status, a continue token in its metadata.
        failing: Arc<Mutex<HashMap<String, u16>>>,
        /// A page never answered, and whether its request was given up.
        hanging: Option<&'static str>,
        given_up: Arc<std::sync::atomic::AtomicBool>,
    }

    /// Marks a request given up when the server's answer to it is dropped unfinished.
    struct GivenUp(Arc<std::sync::atomic::AtomicBool>);

    impl Drop for GivenUp {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Server {
        fn client(&self) -> kube::Client {
            let server = self.clone();
            let service = tower::service_fn(move |request: Request<Body>| {
                let server = server.clone();
                async move { Ok::<_, std::convert::Infallible>(server.answer(request).await) }
            });
            kube::Client::new(service, "default")
        }

        async fn answer(&self, request: Request<Body>) -> Response<Body> {
            let pairs: HashMap<String, String> = query(request.uri()).into_iter().collect();
            self.asked.lock().unwrap().push(
                pairs
                    .get("continue")
                    .cloned()
                    .unwrap_or_else(|| pairs.get("watch").map_or("first", |_| "watch").into()),
            );
            if pairs.contains_key("watch") {
                std::future::pending::<()>().await;
            }
            if self.hanging.is_some() && pairs.get("continue").map(String::as_str) == self.hanging {
                let _given_up = GivenUp(self.given_up.clone());
                std::future::pending::<()>().await;
            }
            let failure = pairs
                .get("continue")
                .and_then(|t| self.failing.lock().unwrap().remove(t));
            if let Some(code) = failure {
                let status = json!({
                    "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                    "reason": "Expired", "message": "the page failed",
                    "metadata": {"continue": "page+/=4"},
                });
                let mut response = Response::new(Body::from(serde_json::to_vec(&status).unwrap()));
                *response.status_mut() = axum::http::StatusCode::from_u16(code).unwrap();
                return response;
            }
            let from = pairs
                .get("continue")
                .map_or(0, |t| t.trim_start_matches("page+/=").parse().unwrap());
            let to = (from + 2).min(self.jobs);
            let items: Vec<_> = (from..to)
                .map(|i| {
                    json!({
                        "apiVersion": "pacer.dev/v1alpha1", "kind": "RunnerJob",
                        "metadata": {"name": format!("job-{i}"), "namespace": "default",
                                     "resourceVersion": "7"},
                        "spec": {"poolName": "linux", "jobId": i + 1, "runId": 1,
                                 "repository": "example-org/api", "labels": ["self-hosted"]},
                    })
                })
                .collect();
            let next = if to < self.jobs {
                format!("page+/={to}")
            } else {
                String::new()
            };
            let body = json!({
                "apiVersion": "pacer.dev/v1alpha1", "kind": "RunnerJobList", "items": items,
                "metadata": {"resourceVersion": "7", "continue": next},
            });
            Response::new(Body::from(serde_json::to_vec(&body).unwrap()))
        }

        fn asked(&self) -> Vec<String> {
            self.asked.lock().unwrap().clone()
        }
    }

    /// The names kube's watcher lists from `server` through the client, in pages of two.
    async fn listed(server: &Server) -> Vec<String> {
        let api: Api<RunnerJob> = Api::namespaced(client(server.client()), "default");
        watcher(api, watcher::Config::default().page_size(2))
            .try_take_while(|e| std::future::ready(Ok(!matches!(e, watcher::Event::InitDone))))
            .try_filter_map(|e| async move {
                Ok(match e {
                    watcher::Event::InitApply(job) => job.metadata.name,
                    _ => None,
                })
            })
            .try_collect()
            .await
            .unwrap()
    }

    fn names(jobs: usize) -> Vec<String> {
        (0..jobs).map(|i| format!("job-{i}")).collect()
    }

    /// A GET of `query` on the RunnerJobs.
    fn list(query: &str) -> Request<Vec<u8>> {
        Request::get(format!("/apis/pacer.dev/v1alpha1/runnerjobs?{query}"))
            .body(Vec::new())
            .unwrap()
    }

    #[tokio::test]
    async fn the_watch_lists_every_page_once_taking_the_pages_fetched_ahead() {
        let server = Server {
            jobs: 7,
            ..Server::default()
        };
        assert_eq!(listed(&server).await, names(7));
        // Each page once: the watcher's requests for pages 2 to 4 took the ones fetched ahead.
        assert_eq!(
            server.asked()[..4],
            ["first", "page+/=2", "page+/=4", "page+/=6"]
        );
    }

    #[tokio::test]
    async fn a_page_whose_fetch_ahead_failed_is_asked_for_again_when_the_watcher_asks() {
        let server = Server {
            jobs: 5,
            ..Server::default()
        };
        server
            .failing
            .lock()
            .unwrap()
            .insert("page+/=2".into(), 500);
        // The watcher never sees the failure.
        assert_eq!(listed(&server).await, names(5));
        assert_eq!(
            server.asked()[..4],
            ["first", "page+/=2", "page+/=2", "page+/=4"]
        );
    }

    #[tokio::test]
    async fn an_error_is_handed_back_as_answered_and_its_continue_token_not_followed() {
        let server = Server {
            jobs: 7,
            ..Server::default()
        };
        server
            .failing
            .lock()
            .unwrap()
            .insert("page+/=2".into(), 410);
        let client = client(server.client());
        let expired = list("limit=2&continue=page%2B%2F%3D2");
        match client.request_text(expired).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 410),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.asked(), ["page+/=2"]);
    }

    #[tokio::test]
    async fn a_page_fetched_ahead_is_given_up_with_the_client() {
        let server = Server {
            jobs: 5,
            hanging: Some("page+/=2"),
            ..Server::default()
        };
        let client = client(server.client());
        let first = list("&limit=2");
        client.request_text(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.asked(), ["first", "page+/=2"]);
        assert!(!server.given_up.load(std::sync::atomic::Ordering::SeqCst));
        // Leadership lost: the watch, its client and the page it had asked ahead for go.
        drop(client);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(server.given_up.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn the_next_page_is_asked_for_as_soon_as_a_page_is_read() {
        let server = Server {
            jobs: 5,
            ..Server::default()
        };
        let client = client(server.client());
        let first = list("&limit=2");
        client.request_text(first).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while server.asked().len() < 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the second page asked for unprompted");
        assert_eq!(server.asked(), ["first", "page+/=2"]);

        // A request for another page drops the one fetched ahead and goes through.
        let other = list("limit=2&continue=page%2B%2F%3D4");
        let text = client.request_text(other).await.unwrap();
        assert!(text.contains("job-4"), "{text}");
        assert_eq!(server.asked(), ["first", "page+/=2", "page+/=4"]);

        // Neither a watch nor a list without a limit is fetched ahead.
        let whole = list("");
        client.request_text(whole).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(server.asked(), ["first", "page+/=2", "page+/=4", "first"]);
    }
}
