//! RunnerPool manifests through both validators: `pacer validate` (the library's
//! `validate_pool_manifest`, all the command runs on a RunnerPool) and the real kube-apiserver
//! with the generated CRD (a server-side dry-run create with strict field validation, as
//! `kubectl apply` sends by default). A bounded property (arbtest, `PACER_FUZZ_MS`: 2 s in
//! `make test`, a minute in `make fuzz`) mutates the example pool one field at a time, now and
//! then two, around each field's bounds: lengths, patterns, numeric ranges and number forms,
//! enum spellings, reserved tag prefixes in any case, empty, full and over-full lists,
//! duplicates, unknown fields (case variants of known ones too), nulls, wrong types, missing
//! fields and names.
//!
//! What must hold, for every manifest generated:
//! - the API server accepts it exactly when `pacer validate` finds no problem (both ways: a
//!   manifest `pacer validate` passes is one `kubectl apply` takes, and one it refuses is one
//!   the API server refuses);
//! - what the API server accepts reads back as a typed `RunnerPool`, as the controller reads
//!   it (one object that does not would stall the controller's watch);
//! - a refusal names a field, on both sides, and the API server's message names one of the
//!   fields `pacer validate` named;
//! - nothing panics.
//!
//! Deliberately outside the agreement, and not generated:
//! - metadata other than `metadata.name`: labels, annotations, finalizers and the rest are
//!   the API server's own rules for every object; `pacer validate` checks a RunnerPool's
//!   name, and the spec.
//! - `status`: the API server drops it on create (the status subresource is Pacer's to
//!   write); `pacer validate` checks it against the schema as written in a file.
//! - JSON objects with the same key twice: serde_json keeps one (the test cannot express
//!   them) and YAML parsers refuse them before either validator sees them.
//! - What both accept and only a reconcile can refuse, with `Validated=False` naming the
//!   field: inputs EC2 must confirm (AMI, types, subnets, groups, profile, root size), the
//!   configuration's tenancy map (`TenantNotPermitted`, `spec.github.owner`), the instances'
//!   whole tag set, which adds Pacer's own tags (namespace, name and controller id) to
//!   `spec.tags` (`TagInvalid`), and the rendered user-data, `spec.userData` shell-quoted into
//!   the boot script with the configured CA, against EC2's 16 KiB (`UserDataTooLarge`).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use arbtest::arbitrary::{Result, Unstructured};
use kube::api::PostParams;
use serde_json::{Value, json};
use support::{Parts, ground, repo_root};

fn budget() -> u64 {
    std::env::var("PACER_FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// The example org pool in `namespace`: every manifest starts from it.
fn example(namespace: &str) -> Value {
    let text =
        std::fs::read_to_string(repo_root().join("examples/runnerpool-org-spot.yaml")).unwrap();
    let mut pool: Value = serde_saphyr::from_str(&text).unwrap();
    pool["metadata"] = json!({"name": "agreement", "namespace": namespace});
    pool
}

/// Why the API server refused a manifest: its status code, message and the fields its causes
/// name.
struct Refusal {
    code: u16,
    message: String,
    fields: Vec<String>,
}

/// What the API server said to a dry-run create: the object it would store, or its refusal.
type Answer = std::result::Result<Value, Refusal>;

/// A server-side dry-run create with `fieldValidation=Strict`, kubectl's default: unknown
/// fields are refused rather than dropped.
async fn server(client: &kube::Client, namespace: &str, manifest: &Value) -> Answer {
    let url = format!("/apis/pacer.dev/v1alpha1/namespaces/{namespace}/runnerpools");
    let params = PostParams {
        dry_run: true,
        field_manager: None,
    };
    let mut request = kube::core::Request::new(url)
        .create(&params, serde_json::to_vec(manifest).unwrap())
        .unwrap();
    let uri = format!("{}&fieldValidation=Strict", request.uri());
    *request.uri_mut() = uri.parse().unwrap();
    match client.request::<Value>(request).await {
        Ok(stored) => Ok(stored),
        Err(kube::Error::Api(status)) if (400..500).contains(&status.code) => Err(Refusal {
            code: status.code,
            message: status.message.clone(),
            fields: (status.details.iter().flat_map(|d| &d.causes))
                .map(|c| c.field.clone())
                .collect(),
        }),
        Err(other) => panic!("the API server did not answer: {other}"),
    }
}

/// Tallies of one run, printed at its end.
#[derive(Default)]
struct Tally {
    accepted: usize,
    refused: usize,
    /// Refusals by the first field `pacer validate` named, list indices left out.
    fields: BTreeMap<String, usize>,
}

/// Whether two field paths name the same field, or one an object or list holding the other
/// (the API server names `spec` for a rule whose evaluation failed, `pacer validate` names
/// the field the rule is about).
fn related(a: &str, b: &str) -> bool {
    let holds = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    holds(a, b) || holds(b, a)
}

/// Checks one manifest against both validators; panics, with the manifest, on any
/// disagreement.
async fn agree(client: &kube::Client, namespace: &str, manifest: &Value, tally: &mut Tally) {
    let problems = pacer::api::validate_pool_manifest(manifest);
    let answer = server(client, namespace, manifest).await;
    let shown = || serde_json::to_string(manifest).unwrap();
    match (&answer, problems.is_empty()) {
        (Ok(stored), true) => {
            tally.accepted += 1;
            if let Err(e) = serde_json::from_value::<pacer::api::RunnerPool>(stored.clone()) {
                panic!(
                    "the API server stores what the controller cannot read ({e}):\n{stored}\nfrom {}",
                    shown()
                );
            }
        }
        (Err(refusal), false) => {
            tally.refused += 1;
            let field = problems[0].field.split('[').next().unwrap_or_default();
            *tally.fields.entry(field.to_string()).or_default() += 1;
            for problem in &problems {
                assert!(
                    !problem.field.is_empty() && !problem.message.is_empty(),
                    "a problem without a field or a message: {problem:?} in {}",
                    shown()
                );
            }
            let Refusal {
                code,
                message,
                fields,
            } = refusal;
            assert!(
                problems.iter().any(|p| message.contains(p.field.as_str())
                    || fields.iter().any(|f| related(f, &p.field))),
                "the API server ({code}) and pacer validate name different fields:\n\
                 server: {message}\npacer validate: {problems:?}\nmanifest: {}",
                shown()
            );
        }
        (Ok(_), false) => panic!(
            "the API server accepts what pacer validate refuses ({problems:?}):\n{}",
            shown()
        ),
        (Err(refusal), true) => panic!(
            "pacer validate passes what the API server refuses ({}: {}):\n{}",
            refusal.code,
            refusal.message,
            shown()
        ),
    }
}

const LOWER_ALNUM: &str = "abcdefghijklmnopqrstuvwxyz0123456789";
const ALNUM: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const HEX: &str = "0123456789abcdef";

/// What a pattern usually forbids, and characters whose byte and character counts differ.
const ODD: &[&str] = &[
    "",
    " ",
    "_",
    "-",
    ".",
    ":",
    "/",
    "+",
    "@",
    "A",
    "Z",
    "é",
    "\u{1F600}",
    "\n",
    "\u{0}",
    "\\",
];

thread_local! {
    /// Set while the other items of a list (or entries of a map) are made around the one
    /// item changed: they keep within bounds and without odd characters.
    static CLEAN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `make` with [`CLEAN`] set.
fn clean<T>(make: impl FnOnce() -> T) -> T {
    let was = CLEAN.replace(true);
    let made = make();
    CLEAN.set(was);
    made
}

/// A length just under, at or just over one of the bounds, or anywhere between them.
fn length_near(u: &mut Unstructured<'_>, min: usize, max: usize) -> Result<usize> {
    if CLEAN.get() {
        return u.int_in_range(min..=max.min(min + 16));
    }
    Ok(match u.int_in_range(0..=5)? {
        0 => min.saturating_sub(1),
        1 => min,
        2 => max,
        3 => max + 1,
        _ => u.int_in_range(min..=max)?,
    })
}

/// `len` characters from `alphabet`, with, one time in four, one of them replaced by an odd
/// one.
fn text(u: &mut Unstructured<'_>, alphabet: &str, len: usize) -> Result<String> {
    let chars: Vec<char> = alphabet.chars().collect();
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        out.push(u.choose(&chars)?.to_string());
    }
    if len > 0 && !CLEAN.get() && u.ratio(1, 4)? {
        let at = u.choose_index(len)?;
        out[at] = u.choose(ODD)?.to_string();
    }
    Ok(out.concat())
}

/// [`text`] of a length near `min..=max`.
fn text_of(u: &mut Unstructured<'_>, alphabet: &str, min: usize, max: usize) -> Result<String> {
    let len = length_near(u, min, max)?;
    text(u, alphabet, len)
}

fn text_near(u: &mut Unstructured<'_>, alphabet: &str, min: usize, max: usize) -> Result<Value> {
    Ok(json!(text_of(u, alphabet, min, max)?))
}

/// `prefix` and hex digits, 8 to 17 of them being valid (subnet, security group and AMI ids).
fn aws_id(u: &mut Unstructured<'_>, prefix: &str) -> Result<Value> {
    let len = length_near(u, 8, 17)?;
    let prefix = match u.int_in_range(0..=9)? {
        0 => prefix.to_uppercase(),
        1 => prefix.trim_end_matches('-').to_string(),
        _ => prefix.to_string(),
    };
    Ok(json!(format!("{prefix}{}", text(u, HEX, len)?)))
}

/// A number just outside, at or inside `min..=max`, or an extreme one, written as JSON an
/// integer usually is, and now and then as a fraction, a whole float or a string.
fn number_near(u: &mut Unstructured<'_>, min: i64, max: i64) -> Result<Value> {
    let n = match u.int_in_range(0..=7)? {
        0 => min - 1,
        1 => min,
        2 => max,
        3 => max + 1,
        4 => *u.choose(&[
            i64::from(i32::MIN),
            i64::from(i32::MAX),
            i64::from(i32::MAX) + 1,
            i64::MAX,
            0,
            -1,
        ])?,
        _ => u.int_in_range(min..=max)?,
    };
    Ok(match u.int_in_range(0..=11)? {
        0 => json!(n as f64 + 0.5),
        1 => json!(n as f64),
        2 => json!(n.to_string()),
        _ => json!(n),
    })
}

/// One of `values`, or a near miss: another case, empty, or a word of the right shape.
fn enum_near(u: &mut Unstructured<'_>, values: &[&str]) -> Result<Value> {
    let value = u.choose(values)?.to_string();
    Ok(json!(match u.int_in_range(0..=7)? {
        0 => value.to_uppercase(),
        1 => {
            let mut chars = value.chars();
            chars
                .next()
                .map(|c| c.to_uppercase().chain(chars).collect())
                .unwrap_or_default()
        }
        2 => String::new(),
        3 => format!("{value} "),
        _ => value,
    }))
}

/// A list of `item`s whose length is near `min..=max`, one of them near its own bounds and
/// the others clean; one time in five with a duplicate.
fn list_near(
    u: &mut Unstructured<'_>,
    min: usize,
    max: usize,
    item: fn(&mut Unstructured<'_>) -> Result<Value>,
) -> Result<Value> {
    let len = length_near(u, min, max)?;
    let changed = if len > 0 { u.choose_index(len)? } else { 0 };
    let mut items = Vec::with_capacity(len);
    for i in 0..len {
        items.push(if i == changed {
            item(u)?
        } else {
            clean(|| item(u))?
        });
    }
    if !items.is_empty() && u.ratio(1, 5)? {
        let copy = items[u.choose_index(items.len())?].clone();
        let at = u.choose_index(items.len())?;
        items[at] = copy.clone();
        if u.ratio(1, 2)? {
            items.push(copy);
        }
    }
    Ok(Value::Array(items))
}

/// A tag key: ordinary, or with a reserved prefix (or a near miss of one) in any case.
fn tag_key(u: &mut Unstructured<'_>) -> Result<String> {
    let prefix = match u.int_in_range(0..=5)? {
        0 | 1 if !CLEAN.get() => {
            let reserved = *u.choose(&["gha:", "aws:", "gha", "aws", "gha-", " gha:", "xaws:"])?;
            let mut cased = String::new();
            for c in reserved.chars() {
                cased.push(if u.arbitrary()? {
                    c.to_ascii_uppercase()
                } else {
                    c
                });
            }
            cased
        }
        _ => String::new(),
    };
    let len = length_near(u, 1, 128)?.saturating_sub(prefix.chars().count());
    Ok(format!("{prefix}{}", text(u, ALNUM, len)?))
}

/// Tags around the example's: one key or value near its bounds (a reserved prefix in any case
/// among them), the rest clean, their count near its bound.
fn tags(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut tags = serde_json::Map::new();
    tags.insert("team".into(), json!("platform"));
    let count = length_near(u, 1, 30)?;
    let entry = |u: &mut Unstructured<'_>| -> Result<(String, Value)> {
        let key = tag_key(u)?;
        Ok((key, json!(text_of(u, ALNUM, 0, 256)?)))
    };
    let (key, value) = entry(u)?;
    tags.insert(key, value);
    for i in tags.len()..count {
        let (key, value) = clean(|| entry(u))?;
        tags.insert(format!("{key}{i}"), value);
    }
    Ok(Value::Object(tags))
}

type Field = (&'static str, fn(&mut Unstructured<'_>) -> Result<Value>);

/// Every spec field, with values near its bounds.
const FIELDS: &[Field] = &[
    ("/spec/github/scope", |u| enum_near(u, &["org", "repo"])),
    ("/spec/github/owner", |u| {
        text_near(u, &format!("{ALNUM}-"), 1, 39)
    }),
    ("/spec/github/repositories", |u| {
        list_near(u, 0, 100, |u| text_near(u, &format!("{ALNUM}._-"), 1, 100))
    }),
    ("/spec/github/runnerGroup", |u| {
        text_near(u, &format!("{ALNUM} -é"), 1, 256)
    }),
    ("/spec/labels", |u| {
        list_near(u, 1, 100, |u| text_near(u, &format!("{ALNUM}-_ "), 1, 256))
    }),
    ("/spec/instanceTypes", |u| {
        list_near(u, 1, 20, |u| {
            let family = text_of(u, LOWER_ALNUM, 1, 6)?;
            let size = text_of(u, LOWER_ALNUM, 1, 8)?;
            let dot = if u.ratio(1, 10)? { "" } else { "." };
            Ok(json!(format!("{family}{dot}{size}")))
        })
    }),
    ("/spec/subnets", |u| {
        list_near(u, 1, 16, |u| aws_id(u, "subnet-"))
    }),
    ("/spec/securityGroups", |u| {
        list_near(u, 1, 5, |u| aws_id(u, "sg-"))
    }),
    ("/spec/ami", |u| aws_id(u, "ami-")),
    ("/spec/instanceProfile", |u| {
        text_near(u, &format!("{ALNUM}_+=,.@-"), 1, 128)
    }),
    ("/spec/metadataHopLimit", |u| number_near(u, 1, 64)),
    ("/spec/rootVolume/sizeGiB", |u| number_near(u, 0, 16384)),
    ("/spec/rootVolume/type", |u| {
        enum_near(u, &["gp3", "gp2", "io1", "io2"])
    }),
    ("/spec/rootVolume/iops", |u| number_near(u, 100, 256_000)),
    ("/spec/rootVolume/throughput", |u| number_near(u, 125, 2000)),
    ("/spec/capacity/type", |u| {
        enum_near(u, &["spot", "onDemand"])
    }),
    ("/spec/capacity/fallbackToOnDemand", |u| {
        Ok(json!(u.arbitrary::<bool>()?))
    }),
    ("/spec/capacity/allocationStrategy", |u| {
        enum_near(
            u,
            &[
                "priceCapacityOptimized",
                "capacityOptimized",
                "lowestPrice",
                "diversified",
                "prioritized",
            ],
        )
    }),
    ("/spec/capacity/interruptionBreaker/notices", |u| {
        number_near(u, 0, 1000)
    }),
    ("/spec/capacity/interruptionBreaker/windowMinutes", |u| {
        number_near(u, 1, 1440)
    }),
    ("/spec/capacity/interruptionBreaker/onDemandMinutes", |u| {
        number_near(u, 1, 1440)
    }),
    ("/spec/spawnMethod", |u| {
        enum_near(u, &["fleet", "runInstances"])
    }),
    ("/spec/runnerVersion", |u| {
        let parts = length_near(u, 3, 3)?;
        let mut numbers = Vec::new();
        for _ in 0..parts {
            numbers.push(text_of(u, "0123456789", 1, 4)?);
        }
        Ok(json!(numbers.join(".")))
    }),
    ("/spec/runnerUser", |u| {
        text_near(u, "abcdefghijklmnopqrstuvwxyz0123456789_-", 1, 32)
    }),
    ("/spec/priority", |u| number_near(u, -1000, 1000)),
    ("/spec/maxRunners", |u| number_near(u, 1, 10_000)),
    ("/spec/maxRuntimeMinutes", |u| number_near(u, 1, 10_080)),
    ("/spec/bootTimeoutSeconds", |u| number_near(u, 60, 7200)),
    ("/spec/idleTimeoutSeconds", |u| number_near(u, 60, 86_400)),
    ("/spec/maxAttempts", |u| number_near(u, 1, 10)),
    ("/spec/rerunInterrupted", |u| {
        Ok(json!(u.arbitrary::<bool>()?))
    }),
    ("/spec/ttlSecondsAfterFinished", |u| {
        number_near(u, 0, 604_800)
    }),
    ("/spec/tags", tags),
    ("/spec/userData", |u| {
        text_near(u, "abcdefghijklmnopqrstuvwxyz #!\n\"'$é", 0, 8192)
    }),
];

/// Objects a field may be added to, for unknown fields.
const OBJECTS: &[&str] = &[
    "",
    "/spec",
    "/spec/github",
    "/spec/rootVolume",
    "/spec/capacity",
    "/spec/capacity/interruptionBreaker",
];

/// Sets `pointer` in `value`, making the objects on the way.
fn set(value: &mut Value, pointer: &str, new: Value) {
    let mut at = value;
    let keys: Vec<&str> = pointer.split('/').skip(1).collect();
    for key in &keys[..keys.len() - 1] {
        if !at.get(*key).is_some_and(Value::is_object) {
            at[*key] = json!({});
        }
        at = &mut at[*key];
    }
    at[keys[keys.len() - 1]] = new;
}

fn remove(value: &mut Value, pointer: &str) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    if let Some(Value::Object(map)) = value.pointer_mut(parent) {
        map.remove(key);
    }
}

/// One change to `pool`.
fn mutate(u: &mut Unstructured<'_>, pool: &mut Value) -> Result<()> {
    let (pointer, near) = *u.choose(FIELDS)?;
    match u.int_in_range(0..=19)? {
        0 => remove(pool, pointer),
        1 => set(pool, pointer, Value::Null),
        2 => {
            let wrong = [
                json!(true),
                json!(1),
                json!("1"),
                json!([]),
                json!({}),
                json!(["x"]),
            ];
            let wrong = u.choose(&wrong)?.clone();
            set(pool, pointer, wrong);
        }
        3 => {
            let object = *u.choose(OBJECTS)?;
            let name = *u.choose(&[
                "bogus",
                "Labels",
                "maxrunners",
                "sizeGib",
                "Type",
                "OWNER",
                "fallbackToOndemand",
                "x-kubernetes",
            ])?;
            set(pool, &format!("{object}/{name}"), json!(1));
        }
        4 => {
            let name = match u.int_in_range(0..=4)? {
                0 => text_of(u, &format!("{LOWER_ALNUM}-."), 1, 253)?,
                1 => format!("-{}", text(u, LOWER_ALNUM, 5)?),
                2 => text(u, ALNUM, 8)?,
                3 => String::new(),
                _ => format!("{}.{}", text(u, LOWER_ALNUM, 4)?, text(u, LOWER_ALNUM, 4)?),
            };
            pool["metadata"]["name"] = json!(name);
        }
        5 => {
            let scope = enum_near(u, &["org", "repo"])?;
            pool["spec"]["github"]["scope"] = scope;
            if u.arbitrary()? {
                remove(pool, "/spec/github/runnerGroup");
            }
            if u.arbitrary()? {
                let repositories = list_near(u, 0, 3, |u| text_near(u, ALNUM, 1, 10))?;
                pool["spec"]["github"]["repositories"] = repositories;
            }
        }
        _ => {
            let value = near(u)?;
            set(pool, pointer, value);
        }
    }
    Ok(())
}

/// The ground's API server and a namespace for dry runs, on a runtime of the test's own.
fn setup(test: &str) -> (tokio::runtime::Runtime, kube::Client, String) {
    let ground = ground(Parts::Kube);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (client, namespace) = runtime.block_on(async {
        let client = ground.kube_client().await;
        let namespace = ground.namespace(&client, test).await;
        (client, namespace)
    });
    (runtime, client, namespace)
}

#[test]
fn pacer_validate_and_the_api_server_accept_and_refuse_the_same_pools() {
    let (runtime, client, namespace) = setup("agreement");
    let base = example(&namespace);
    let mut tally = Tally::default();
    runtime.block_on(agree(&client, &namespace, &base, &mut tally));
    arbtest::arbtest(|u| {
        let mut pool = base.clone();
        mutate(u, &mut pool)?;
        if u.ratio(1, 4)? {
            mutate(u, &mut pool)?;
        }
        runtime.block_on(agree(&client, &namespace, &pool, &mut tally));
        Ok(())
    })
    .budget(Duration::from_millis(budget()));
    println!(
        "{} pools accepted by both, {} refused by both; refusals by first field: {:?}",
        tally.accepted, tally.refused, tally.fields
    );
    assert!(
        tally.accepted > 0 && tally.refused > 0,
        "the property never saw both outcomes"
    );
}

/// Counterexamples the property found, kept as they were found.
#[test]
fn counterexamples_stay_agreed() {
    let (runtime, client, namespace) = setup("counterexamples");
    type Change = fn(&mut Value);
    let cases: &[(&str, Change)] = &[
        // The API server dropped a null it was not told was nullable; pacer validate called
        // it "must not be null".
        ("a null boolean", |p| {
            p["spec"]["capacity"]["fallbackToOnDemand"] = Value::Null
        }),
        ("a null required field", |p| p["spec"]["ami"] = Value::Null),
        ("a null nested default", |p| {
            p["spec"]["capacity"]["interruptionBreaker"] = json!({"notices": null})
        }),
        // The CRD said nullable but its enum, without null, refused it; pacer validate took it.
        ("a null optional enum", |p| {
            p["spec"]["capacity"]["allocationStrategy"] = Value::Null
        }),
        ("a null optional field under a rule", |p| {
            p["spec"]["rootVolume"] = json!({"type": "gp2", "iops": null, "throughput": null});
            p["spec"]["github"] = json!({"scope": "repo", "owner": "o", "repositories": ["r"],
                                         "runnerGroup": null});
        }),
        // pacer validate accepted any non-empty name.
        ("a name that is no DNS subdomain", |p| {
            p["metadata"]["name"] = json!("1e9u.s@w9")
        }),
        ("a name with capitals", |p| {
            p["metadata"]["name"] = json!("Linux")
        }),
        // The API server reads a whole float as an integer; pacer validate refused it.
        ("a whole float for an integer", |p| {
            p["spec"]["metadataHopLimit"] = json!(31.0)
        }),
        ("a fraction for an integer", |p| {
            p["spec"]["maxRunners"] = json!(2.5)
        }),
        // The API server then names only `spec` when a rule reading such a float fails.
        ("a whole float under a failing rule", |p| {
            p["spec"]["rootVolume"] = json!({"type": "gp2", "throughput": 250.0})
        }),
    ];
    let mut tally = Tally::default();
    for (what, change) in cases {
        let mut pool = example(&namespace);
        change(&mut pool);
        println!("{what}");
        runtime.block_on(agree(&client, &namespace, &pool, &mut tally));
    }
    assert!(tally.accepted > 0 && tally.refused > 0);
}
