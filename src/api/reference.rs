//! `docs/reference.md`: the RunnerPool and RunnerJob fields, generated from the CRDs' schemas
//! (the doc comments on the types), so the reference cannot drift from what the API server
//! enforces.

use std::fmt::Write as _;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;

use super::crds;

/// The whole page.
pub fn markdown() -> String {
    let mut out = String::from(
        "# RunnerPool and RunnerJob reference\n\n\
         Generated from the CRDs (`make generate`; a test fails when it drifts). Group \
         `pacer.dev`, version `v1alpha1`. Constraints are enforced by the API server \
         (`pacer validate` checks the same offline).\n",
    );
    for crd in crds() {
        let version = &crd.spec.versions[0];
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("our CRDs have schemas");
        let _ = write!(
            out,
            "\n## {} (`{}`, short name `{}`)\n\n{}\n",
            crd.spec.names.kind,
            crd.spec.names.plural,
            crd.spec
                .names
                .short_names
                .as_ref()
                .and_then(|n| n.first())
                .cloned()
                .unwrap_or_default(),
            one_line(schema.description.as_deref().unwrap_or_default())
        );
        for part in ["spec", "status"] {
            let Some(props) = schema.properties.as_ref().and_then(|p| p.get(part)) else {
                continue;
            };
            let _ = write!(
                out,
                "\n### `{part}`\n\n| field | type | constraints | description |\n| --- | --- | --- | --- |\n"
            );
            fields(&mut out, part, props);
        }
    }
    out
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn kind(props: &JSONSchemaProps) -> String {
    match props.type_.as_deref() {
        Some("array") => {
            let item = props
                .items
                .as_ref()
                .and_then(|i| match i {
                    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => Some(kind(s)),
                    _ => None,
                })
                .unwrap_or_else(|| "?".into());
            format!("[]{item}")
        }
        Some("object") if props.properties.is_none() && props.additional_properties.is_some() => {
            "map[string]string".into()
        }
        Some(t) => t.into(),
        None if props.x_kubernetes_int_or_string == Some(true) => "int or string".into(),
        None => "any".into(),
    }
}

fn constraints(props: &JSONSchemaProps) -> String {
    let mut all = Vec::new();
    if let Some(values) = &props.enum_ {
        let values: Vec<String> = values.iter().map(|v| v.0.to_string()).collect();
        all.push(format!("one of {}", values.join(", ")));
    }
    if let Some(v) = props.minimum {
        all.push(format!("≥ {v}"));
    }
    if let Some(v) = props.maximum {
        all.push(format!("≤ {v}"));
    }
    if let Some(v) = props.min_length {
        all.push(format!("length ≥ {v}"));
    }
    if let Some(v) = props.max_length {
        all.push(format!("length ≤ {v}"));
    }
    if let Some(v) = props.max_items {
        all.push(format!("≤ {v} items"));
    }
    if let Some(v) = props.min_items {
        all.push(format!("≥ {v} items"));
    }
    if let Some(p) = &props.pattern {
        all.push(format!("matches `{}`", p.replace('|', "\\|")));
    }
    if let Some(d) = &props.default {
        all.push(format!("default `{}`", d.0));
    }
    all.join("; ")
}

fn fields(out: &mut String, path: &str, props: &JSONSchemaProps) {
    let required = props.required.clone().unwrap_or_default();
    let Some(children) = &props.properties else {
        return;
    };
    for (name, child) in children {
        let here = format!("{path}.{name}");
        let mut description = one_line(child.description.as_deref().unwrap_or_default());
        if required.contains(name) {
            description = format!("**Required.** {description}");
        }
        let _ = writeln!(
            out,
            "| `{here}` | {} | {} | {} |",
            kind(child),
            constraints(child),
            description.replace('|', "\\|")
        );
        if child.properties.is_some() {
            fields(out, &here, child);
        }
        if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(item)) = &child.items
            && item.properties.is_some()
            && !here.ends_with(".conditions")
        {
            fields(out, &format!("{here}[]"), item);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn committed_reference_matches_the_code() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reference.md");
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == super::markdown(),
            "{} is out of date: run `make generate` and commit the result",
            path.display()
        );
    }

    #[test]
    fn every_spec_field_is_described() {
        let page = super::markdown();
        for row in page.lines().filter(|l| l.starts_with("| `spec.")) {
            let description = row.rsplit(" | ").next().unwrap().trim_end_matches(" |");
            assert!(description.len() > 3, "undescribed: {row}");
        }
    }
}
