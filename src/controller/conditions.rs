//! Status conditions in Kubernetes' conventions: the transition time moves only when the
//! status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// Sets condition `type_`, keeping its transition time when the status is unchanged. Returns
/// whether the status or reason changed (worth an Event).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Time,
) -> bool {
    let status = if status { "True" } else { "False" }.to_string();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status || c.reason != reason;
            if c.status != status {
                c.last_transition_time = now;
            }
            c.status = status;
            c.reason = reason.into();
            c.message = message;
            c.observed_generation = generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.into(),
                status,
                reason: reason.into(),
                message,
                observed_generation: generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// Whether condition `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let mut c = Vec::new();
        assert!(set(
            &mut c,
            "Ready",
            false,
            "AmiNotFound",
            "m",
            Some(1),
            at(10)
        ));
        assert!(set(
            &mut c,
            "Ready",
            false,
            "SubnetNotFound",
            "m",
            Some(2),
            at(20)
        ));
        assert_eq!(c[0].last_transition_time, at(10));
        assert!(!set(
            &mut c,
            "Ready",
            false,
            "SubnetNotFound",
            "other words",
            Some(2),
            at(30)
        ));
        assert!(set(&mut c, "Ready", true, "Ready", "m", Some(3), at(40)));
        assert_eq!(c[0].last_transition_time, at(40));
        assert!(is_true(&c, "Ready"));
    }
}
