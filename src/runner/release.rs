//! The actions/runner releases Pacer serves its instances. Pacer reads a release's description
//! (version, assets, each asset's SHA-256) from its source (GitHub's releases API for
//! actions/runner, or a mirror that answers the same way), downloads each asset it needs once,
//! checks it against the published digest, keeps it on disk (a few at most) and serves it to
//! its instances over its own listener. The instances never reach GitHub for it: GitHub
//! Enterprise Server (which has no actions/runner releases) and private subnets without a route
//! to github.com work the same.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::Digest as _;
use tracing::{info, warn};

use crate::domain::pool::hex;

/// GitHub's releases API for actions/runner: the default source.
pub const GITHUB_RELEASES: &str = "https://api.github.com/repos/actions/runner/releases";

/// How long the latest release is taken as still the latest.
const LATEST_TTL: Duration = Duration::from_secs(60 * 60);

/// How many release files are kept on disk; past it, the least recently served goes. With the
/// downloads under way (one an asset), about 5 × 200 MB at most: the chart's `emptyDir` is 2 GiB.
const KEPT: usize = 3;

/// The largest asset Pacer downloads (actions/runner's are about 200 MB).
const MAX_ASSET_BYTES: u64 = 512 << 20;

/// The largest release description Pacer reads.
const MAX_DESCRIPTION_BYTES: usize = 4 << 20;

/// The longest a download may take, start to end.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Releases served at once: each holds a connection for its whole transfer, and the listener
/// keeps room for webhooks and callbacks.
pub const MAX_SERVING: usize = 64;

/// How long a failure is remembered before the source is asked again: one that may pass
/// (the source down) briefly; one that will not (missing, or not the published bytes) longer,
/// so that instances asking for it do not each start another download.
fn held(why: &ReleaseError) -> Duration {
    match why {
        ReleaseError::Unavailable(_) => Duration::from_secs(15),
        ReleaseError::Missing(_) | ReleaseError::Refused(_) => Duration::from_secs(60),
    }
}

/// One release asset for one architecture: what the instance is told to fetch, from Pacer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// Such as `2.329.0`.
    pub version: String,
    /// The asset's file name, such as `actions-runner-linux-x64-2.329.0.tar.gz`.
    pub asset: String,
    /// Lower-case hex.
    pub sha256: String,
    /// Where the source serves it.
    source_url: String,
}

/// Why a release could not be described or served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// The source did not answer, or answered an error that may pass: ask again later.
    #[error("the actions/runner release source is unavailable: {0}")]
    Unavailable(String),
    /// The source has no such release or asset.
    #[error("{0}")]
    Missing(String),
    /// What the source served is not what it published, or too large: not served.
    #[error("{0}")]
    Refused(String),
}

/// Where a release's file stands.
#[derive(Debug)]
pub enum Fetch {
    /// Checked and on disk.
    Ready(PathBuf),
    /// Being fetched (or checked) in the background: ask again shortly.
    Pending,
    Failed(ReleaseError),
}

/// The releases one Pacer process serves: their descriptions, and the files it downloaded.
pub struct Releases {
    source: String,
    http: reqwest::Client,
    dir: PathBuf,
    /// "latest" or a version → what the source said last, held while it is read again: one
    /// read at a time.
    described: tokio::sync::Mutex<HashMap<String, Described>>,
    /// Asset name → the file's state in the cache.
    files: Mutex<HashMap<String, File>>,
    /// Transfers to instances under way.
    pub serving: Arc<tokio::sync::Semaphore>,
}

#[derive(Clone, Debug, Default)]
struct Described {
    /// The release and when it was read.
    release: Option<(Description, Instant)>,
    /// The last read's failure, and when.
    failed: Option<(ReleaseError, Instant)>,
}

#[derive(Clone, Debug)]
struct Description {
    version: String,
    /// (name, source URL, SHA-256) of each asset with a SHA-256 digest.
    assets: Vec<(String, String, String)>,
}

#[derive(Clone, Debug)]
enum File {
    /// On disk, checked against this SHA-256 by this process; when it was last served.
    Checked(String, Instant),
    /// On disk from before this process started: checked before it is served.
    Found(Instant),
    /// Being downloaded or checked.
    Fetching,
    /// Its download failed this way, at that time.
    Failed(ReleaseError, Instant),
}

impl Releases {
    /// Serves releases described at `source` (a base URL answering `/latest` and
    /// `/tags/v{version}` as GitHub's releases API does), kept in `dir`.
    pub fn new(source: &str, dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A download cut off by the last stop.
                let _ = std::fs::remove_file(entry.path());
            } else {
                files.insert(name, File::Found(Instant::now()));
            }
        }
        evict(&mut files, dir);
        Ok(Self {
            source: source.trim_end_matches('/').to_string(),
            http: client(source).map_err(std::io::Error::other)?,
            dir: dir.to_path_buf(),
            described: tokio::sync::Mutex::default(),
            files: Mutex::new(files),
            serving: Arc::new(tokio::sync::Semaphore::new(MAX_SERVING)),
        })
    }

    /// Release `version` (`None`: the latest) for `arch` (`x64`, `arm64`), as its source
    /// describes it. A latest release that cannot be read again stays the latest until it can.
    pub async fn release(
        &self,
        version: Option<&str>,
        arch: &str,
    ) -> Result<Release, ReleaseError> {
        let key = version.unwrap_or("latest");
        let mut cache = self.described.lock().await;
        let entry = cache.get(key).cloned().unwrap_or_default();
        let fresh = (entry.release.as_ref())
            .filter(|(_, read)| version.is_some() || read.elapsed() < LATEST_TTL)
            .map(|(d, _)| d.clone());
        let description = match (fresh, entry.failed) {
            (Some(fresh), _) => fresh,
            (None, Some((why, at))) if at.elapsed() < held(&why) => {
                entry.release.map(|(d, _)| d).ok_or(why)?
            }
            (None, _) => match describe(&self.http, &self.source, version).await {
                Ok(d) => {
                    let read = Described {
                        release: Some((d.clone(), Instant::now())),
                        failed: None,
                    };
                    cache.insert(d.version.clone(), read.clone());
                    cache.insert(key.to_string(), read);
                    d
                }
                Err(why) => {
                    let stale = entry.release.map(|(d, _)| d);
                    if stale.is_some() {
                        warn!(error = %why, "the latest actions/runner release could not be read again; the last one read stays the latest");
                    }
                    let failed = Some((why.clone(), Instant::now()));
                    let release = (cache.get(key)).and_then(|e| e.release.clone());
                    cache.insert(key.to_string(), Described { release, failed });
                    stale.ok_or(why)?
                }
            },
        };
        drop(cache);
        let name = crate::github::runner_asset_name(&description.version, arch);
        let (asset, url, sha256) = (description.assets.iter())
            .find(|(asset, ..)| *asset == name)
            .ok_or_else(|| {
                ReleaseError::Missing(format!(
                    "actions/runner {} has no asset {name} with a SHA-256 digest at {}",
                    description.version, self.source
                ))
            })?;
        Ok(Release {
            version: description.version.clone(),
            asset: asset.clone(),
            sha256: sha256.clone(),
            source_url: url.clone(),
        })
    }

    /// Where the file of `release` stands; when it is neither on disk and checked nor being
    /// fetched, its fetch starts in the background (one an asset), and is checked against the
    /// published SHA-256 before it is served.
    pub fn fetch(self: &Arc<Self>, release: &Release) -> Fetch {
        let path = self.dir.join(&release.asset);
        let mut files = self.files.lock().expect("not poisoned");
        let found = match files.get_mut(&release.asset) {
            Some(File::Checked(sha256, used)) if *sha256 == release.sha256 => {
                *used = Instant::now();
                return Fetch::Ready(path);
            }
            Some(File::Fetching) => return Fetch::Pending,
            Some(File::Failed(why, at)) if at.elapsed() < held(why) => {
                return Fetch::Failed(why.clone());
            }
            found => matches!(found, Some(File::Found(_))),
        };
        files.insert(release.asset.clone(), File::Fetching);
        drop(files);
        let (releases, release) = (self.clone(), release.clone());
        tokio::spawn(async move {
            let kept = found && sha256_of_file(&path).await.as_ref() == Some(&release.sha256);
            let outcome = match kept {
                true => Ok(()),
                false => releases.download(&release, &path).await,
            };
            let mut files = releases.files.lock().expect("not poisoned");
            let state = match outcome {
                Ok(()) => File::Checked(release.sha256.clone(), Instant::now()),
                Err(why) => File::Failed(why, Instant::now()),
            };
            files.insert(release.asset.clone(), state);
            evict(&mut files, &releases.dir);
        });
        Fetch::Pending
    }

    /// Downloads `release` from its source to `path`, checking its size and digest on the way:
    /// the file appears only once it is known good.
    async fn download(&self, release: &Release, path: &Path) -> Result<(), ReleaseError> {
        use tokio::io::AsyncWriteExt as _;
        let url = &release.source_url;
        let started = Instant::now();
        info!(asset = %release.asset, %url, "downloading an actions/runner release");
        let unavailable =
            |e: &dyn std::fmt::Display| ReleaseError::Unavailable(format!("GET {url}: {e}"));
        let too_large =
            || ReleaseError::Refused(format!("{url} is over {} MiB", MAX_ASSET_BYTES >> 20));
        let mut response = (self.http.get(url))
            .timeout(DOWNLOAD_TIMEOUT)
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Err(ReleaseError::Missing(format!("{url} answered 404")));
        }
        if !status.is_success() {
            return Err(unavailable(&format!("answered {status}")));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ASSET_BYTES)
        {
            return Err(too_large());
        }
        let partial = self.dir.join(format!(".{}.partial", release.asset));
        let io = |e: std::io::Error| {
            ReleaseError::Unavailable(format!("writing {}: {e}", partial.display()))
        };
        let mut out = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut hash = sha2::Sha256::new();
        let mut size = 0u64;
        let copied: Result<(), ReleaseError> = async {
            while let Some(chunk) = response.chunk().await.map_err(|e| unavailable(&e))? {
                size += chunk.len() as u64;
                if size > MAX_ASSET_BYTES {
                    return Err(too_large());
                }
                hash.update(&chunk);
                out.write_all(&chunk).await.map_err(io)?;
            }
            out.sync_all().await.map_err(io)
        }
        .await;
        let checked = copied.and_then(|()| {
            let actual = hex(&hash.finalize());
            if actual == release.sha256 {
                Ok(())
            } else {
                Err(ReleaseError::Refused(format!(
                    "{} from {url} has SHA-256 {actual}, not the {} its source publishes; Pacer does not serve it",
                    release.asset, release.sha256
                )))
            }
        });
        let placed = match checked {
            Ok(()) => tokio::fs::rename(&partial, path).await.map_err(io),
            Err(e) => Err(e),
        };
        if let Err(why) = &placed {
            let _ = tokio::fs::remove_file(&partial).await;
            warn!(asset = %release.asset, error = %why, "an actions/runner release could not be kept");
        } else {
            info!(asset = %release.asset, bytes = size, seconds = started.elapsed().as_secs_f64(),
                "actions/runner release downloaded and checked");
        }
        placed
    }
}

/// The client releases are read with: every redirect of an `https://` source stays HTTPS.
fn client(source: &str) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(concat!("pacer/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .https_only(source.starts_with("https://"))
        .build()
}

/// Reads release `version` (`None`: the latest) as `source` describes it: within a request's
/// time, at most [`MAX_DESCRIPTION_BYTES`], its tag a version of three numbers.
async fn describe(
    http: &reqwest::Client,
    source: &str,
    version: Option<&str>,
) -> Result<Description, ReleaseError> {
    #[derive(Deserialize)]
    struct Asset {
        name: String,
        browser_download_url: String,
        #[serde(default)]
        digest: Option<String>,
    }
    #[derive(Deserialize)]
    struct Answer {
        tag_name: String,
        assets: Vec<Asset>,
    }
    let url = match version {
        Some(v) => format!("{source}/tags/v{v}"),
        None => format!("{source}/latest"),
    };
    let unavailable =
        |e: &dyn std::fmt::Display| ReleaseError::Unavailable(format!("GET {url}: {e}"));
    let mut response = (http.get(&url))
        .header(reqwest::header::ACCEPT, "application/vnd.github+json")
        .timeout(Duration::from_secs(8))
        .send()
        .await
        .map_err(|e| unavailable(&e))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(ReleaseError::Missing(format!(
            "no actions/runner release {} at {source}",
            version.unwrap_or("(latest)"),
        )));
    }
    if !status.is_success() {
        return Err(unavailable(&format!("answered {status}")));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| unavailable(&e))? {
        if body.len() + chunk.len() > MAX_DESCRIPTION_BYTES {
            return Err(unavailable(&format!(
                "over {} MiB",
                MAX_DESCRIPTION_BYTES >> 20
            )));
        }
        body.extend_from_slice(&chunk);
    }
    let answer: Answer = serde_json::from_slice(&body).map_err(|e| unavailable(&e))?;
    let tag = answer.tag_name.trim_start_matches('v');
    if !is_version(tag) {
        return Err(unavailable(&format!(
            "tag {:?} is not a version",
            answer.tag_name
        )));
    }
    let assets = (answer.assets.into_iter())
        .filter_map(|a| {
            let sha256 = sha256_of_digest(a.digest.as_deref()?)?;
            Some((a.name, a.browser_download_url, sha256))
        })
        .collect();
    Ok(Description {
        version: tag.to_string(),
        assets,
    })
}

/// Whether `tag` is a version such as `2.329.0`.
fn is_version(tag: &str) -> bool {
    let parts: Vec<&str> = tag.split('.').collect();
    parts.len() == 3
        && (parts.iter())
            .all(|p| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// The latest release's version at `source` (`pacer doctor`).
pub async fn latest_version(source: &str) -> Result<String, ReleaseError> {
    let http = client(source).map_err(|e| ReleaseError::Unavailable(e.to_string()))?;
    let described = describe(&http, source.trim_end_matches('/'), None).await?;
    Ok(described.version)
}

/// Drops the files past the [`KEPT`] most recently served.
fn evict(files: &mut HashMap<String, File>, dir: &Path) {
    let mut kept: Vec<(String, Instant)> = (files.iter())
        .filter_map(|(name, file)| match file {
            File::Checked(_, at) | File::Found(at) => Some((name.clone(), *at)),
            File::Fetching | File::Failed(..) => None,
        })
        .collect();
    if kept.len() <= KEPT {
        return;
    }
    kept.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
    for (name, _) in kept.split_off(KEPT) {
        files.remove(&name);
        // A file being served stays readable until its reader closes it.
        let _ = std::fs::remove_file(dir.join(&name));
    }
}

/// The hex SHA-256 of GitHub's asset `digest` (`sha256:<hex>`), if it is one.
fn sha256_of_digest(digest: &str) -> Option<String> {
    (digest.strip_prefix("sha256:"))
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_ascii_lowercase)
}

/// The hex SHA-256 of a file's bytes, if it can be read.
async fn sha256_of_file(path: &Path) -> Option<String> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut file = std::fs::File::open(path).ok()?;
        let mut hash = sha2::Sha256::new();
        let mut buffer = vec![0; 1 << 16];
        loop {
            match file.read(&mut buffer).ok()? {
                0 => return Some(hex(&hash.finalize())),
                n => hash.update(&buffer[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sha256_digests_of_64_hex_digits_are_taken() {
        let hex64 = "AB".repeat(32);
        assert_eq!(
            sha256_of_digest(&format!("sha256:{hex64}")),
            Some("ab".repeat(32))
        );
        assert_eq!(sha256_of_digest(&format!("sha512:{hex64}")), None);
        assert_eq!(sha256_of_digest("sha256:abc"), None);
        assert_eq!(
            sha256_of_digest(&format!("sha256:{}", "zz".repeat(32))),
            None
        );
    }

    /// A release source on loopback: `/latest` describes `2.9.0` with one x64 asset of
    /// `bytes`, published with `digest`; every request is counted by path.
    async fn source(bytes: Vec<u8>, digest: String) -> (String, Arc<Mutex<HashMap<String, u32>>>) {
        use axum::routing::get;
        let counts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let asset = crate::github::runner_asset_name("2.9.0", "x64");
        let description = serde_json::json!({
            "tag_name": "v2.9.0",
            "assets": [{
                "name": asset,
                "browser_download_url": format!("{base}/download/{asset}"),
                "digest": format!("sha256:{digest}"),
            }],
        });
        let counted = counts.clone();
        let app = axum::Router::new()
            .route(
                "/latest",
                get(move || async move { axum::Json(description) }),
            )
            .route("/download/{name}", get(move || async move { bytes }))
            .layer(axum::middleware::from_fn(
                move |request: axum::extract::Request, next: axum::middleware::Next| {
                    let path = request.uri().path().to_string();
                    *counted.lock().unwrap().entry(path).or_default() += 1;
                    next.run(request)
                },
            ));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, counts)
    }

    async fn settled(releases: &Arc<Releases>, release: &Release) -> Fetch {
        loop {
            match releases.fetch(release) {
                Fetch::Pending => tokio::time::sleep(Duration::from_millis(20)).await,
                settled => return settled,
            }
        }
    }

    #[tokio::test]
    async fn a_release_is_downloaded_once_for_many_askers_and_refused_when_its_bytes_differ() {
        let dir = std::env::temp_dir().join(format!("pacer-releases-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let bytes = b"a runner".to_vec();
        let digest = hex(&sha2::Sha256::digest(&bytes));
        let (base, counts) = source(bytes.clone(), digest.clone()).await;
        let releases = Arc::new(Releases::new(&base, &dir.join("good")).unwrap());
        let release = releases.release(None, "x64").await.unwrap();
        assert_eq!(
            (release.version.as_str(), release.sha256.as_str()),
            ("2.9.0", digest.as_str())
        );
        // Many instances ask at once: one download, and every one is served the checked file.
        for _ in 0..20 {
            releases.fetch(&release);
        }
        let Fetch::Ready(path) = settled(&releases, &release).await else {
            panic!("not served")
        };
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let asked = counts.lock().unwrap().clone();
        assert_eq!(asked.values().sum::<u32>(), 2, "{asked:?}");
        // Described once: the pinned version it resolved to is known without another read.
        releases.release(Some("2.9.0"), "x64").await.unwrap();
        assert_eq!(counts.lock().unwrap().values().sum::<u32>(), 2);
        assert!(matches!(
            releases.release(None, "arm64").await,
            Err(ReleaseError::Missing(_))
        ));

        // A source whose bytes are not the ones it published: refused, and not downloaded
        // again for each asker.
        let (base, counts) = source(b"something else".to_vec(), digest).await;
        let releases = Arc::new(Releases::new(&base, &dir.join("bad")).unwrap());
        let release = releases.release(None, "x64").await.unwrap();
        let Fetch::Failed(ReleaseError::Refused(why)) = settled(&releases, &release).await else {
            panic!("served the wrong bytes")
        };
        assert!(why.contains("its source publishes"), "{why}");
        assert!(matches!(releases.fetch(&release), Fetch::Failed(_)));
        let downloads = counts
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.starts_with("/download"))
            .map(|(_, n)| *n)
            .sum::<u32>();
        assert_eq!(downloads, 1);
        assert_eq!(std::fs::read_dir(dir.join("bad")).unwrap().count(), 0);

        // A source that does not answer: unavailable, and not asked again at once.
        let down = Releases::new("http://127.0.0.1:9", &dir.join("down")).unwrap();
        for _ in 0..2 {
            assert!(matches!(
                down.release(None, "x64").await,
                Err(ReleaseError::Unavailable(_))
            ));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_three_numbers_make_a_version() {
        for good in ["2.329.0", "10.0.1"] {
            assert!(is_version(good), "{good}");
        }
        for bad in [
            "",
            "2.329",
            "2.329.0.1",
            "2..0",
            "2.329.0-rc",
            "../../x",
            "2.3a.0",
        ] {
            assert!(!is_version(bad), "{bad}");
        }
    }

    #[test]
    fn the_least_recently_served_files_go_past_the_bound() {
        let dir = std::env::temp_dir().join(format!("pacer-evict-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let start = Instant::now();
        let mut files = HashMap::new();
        for n in 0..(KEPT + 2) {
            let name = format!("a{n}.tar.gz");
            std::fs::write(dir.join(&name), b"x").unwrap();
            let used = start + Duration::from_secs(n as u64);
            files.insert(name, File::Checked(String::new(), used));
        }
        files.insert(
            "failed".into(),
            File::Failed(ReleaseError::Missing("gone".into()), start),
        );
        evict(&mut files, &dir);
        let mut left: Vec<_> = files.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["a2.tar.gz", "a3.tar.gz", "a4.tar.gz", "failed"]);
        assert!(!dir.join("a0.tar.gz").exists() && !dir.join("a1.tar.gz").exists());
        assert!(dir.join("a4.tar.gz").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
