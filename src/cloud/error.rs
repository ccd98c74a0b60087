//! AWS error codes sorted into the few classes callers branch on. The only place that reads
//! AWS error code strings.

/// What kind of failure an AWS call ended in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The resource does not exist (or no longer does).
    NotFound,
    /// Creating something that is already there.
    AlreadyExists,
    /// Rate limited or briefly unavailable: retry later, change nothing.
    Throttled,
    /// No capacity for this offering right now: try another type, zone or market.
    InsufficientCapacity,
    /// The credentials may not do this.
    Unauthorized,
    /// The request itself is wrong; retrying the same request cannot help.
    InvalidInput,
    /// The resource is not in a state that allows the call (starting an instance that is
    /// still stopping, stopping a terminated one): list it again and decide anew.
    IncorrectState,
    /// The service does not implement the call (emulators).
    NotImplemented,
    /// Anything else, including transport failures: retry with backoff.
    Other,
}

/// A failed AWS call, classified.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{action}: {code}: {message}")]
pub struct CloudError {
    pub class: ErrorClass,
    pub action: &'static str,
    pub code: String,
    pub message: String,
}

impl CloudError {
    pub fn new(action: &'static str, code: impl Into<String>, message: impl Into<String>) -> Self {
        let code = code.into();
        Self {
            class: classify(&code),
            action,
            code,
            message: message.into(),
        }
    }

    pub fn is(&self, class: ErrorClass) -> bool {
        self.class == class
    }

    /// A spot launch refused because the account lacks EC2 Spot's service-linked role
    /// (`AWSServiceRoleForEC2Spot`), which EC2 creates on the first spot launch only for a
    /// caller allowed `iam:CreateServiceLinkedRole`.
    pub fn wants_spot_service_linked_role(&self) -> bool {
        self.code == "AuthFailure.ServiceLinkedRoleCreationNotPermitted"
            || self.message.contains("AWSServiceRoleForEC2Spot")
    }
}

const TABLE: &[(ErrorClass, &[&str])] = &[
    (
        ErrorClass::NotFound,
        &[
            "InvalidAMIID.NotFound",
            "InvalidAMIID.Unavailable",
            "InvalidSubnetID.NotFound",
            "InvalidGroup.NotFound",
            "InvalidInstanceID.NotFound",
            "InvalidLaunchTemplateId.NotFound",
            "InvalidLaunchTemplateName.NotFoundException",
            "InvalidLaunchTemplateId.VersionNotFound",
            // DescribeInstanceTypes' answer for a type that does not exist.
            "InvalidInstanceType",
            "NoSuchEntity",
        ],
    ),
    (
        ErrorClass::AlreadyExists,
        &[
            "InvalidLaunchTemplateName.AlreadyExistsException",
            "EntityAlreadyExists",
        ],
    ),
    (
        ErrorClass::Throttled,
        &[
            "RequestLimitExceeded",
            "Throttling",
            "ThrottlingException",
            "TooManyRequestsException",
            "ServiceUnavailable",
            "Unavailable",
            "InternalError",
            "InternalFailure",
        ],
    ),
    (
        ErrorClass::InsufficientCapacity,
        &[
            "InsufficientInstanceCapacity",
            "InsufficientHostCapacity",
            "InsufficientCapacity",
            "SpotMaxPriceTooLow",
            "MaxSpotInstanceCountExceeded",
            "InstanceLimitExceeded",
            "VcpuLimitExceeded",
            "Unsupported",
            "UnfulfillableCapacity",
        ],
    ),
    (
        ErrorClass::Unauthorized,
        &[
            "UnauthorizedOperation",
            "AccessDenied",
            "AccessDeniedException",
            "AuthFailure",
            // The account has no AWSServiceRoleForEC2Spot and the caller may not create it.
            "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
            "OptInRequired",
        ],
    ),
    (
        ErrorClass::InvalidInput,
        &[
            "InvalidParameter",
            "InvalidParameterValue",
            "InvalidParameterCombination",
            "InvalidLaunchTemplateName.MalformedException",
            "InvalidAMIID.Malformed",
            "InvalidSubnetID.Malformed",
            "InvalidGroupId.Malformed",
            "InvalidBlockDeviceMapping",
            "InvalidUserData.Malformed",
            "ValidationError",
            "MissingParameter",
            // A ClientToken reused with other parameters: the same request cannot succeed.
            "IdempotentParameterMismatch",
            // Stopping what EC2 cannot stop: a one-time spot instance, an instance-store root.
            "UnsupportedOperation",
        ],
    ),
    (
        ErrorClass::IncorrectState,
        // OperationNotPermitted: an instance protected from termination, among others.
        &[
            "IncorrectInstanceState",
            "IncorrectState",
            "OperationNotPermitted",
        ],
    ),
    (
        ErrorClass::NotImplemented,
        &["NotImplemented", "InternalFailureNotImplemented"],
    ),
];

/// The class of an AWS error code.
pub fn classify(code: &str) -> ErrorClass {
    TABLE
        .iter()
        .find(|(_, codes)| codes.contains(&code))
        .map(|(class, _)| *class)
        .unwrap_or_else(|| {
            if code.ends_with(".NotFound") || code.ends_with("NotFoundException") {
                ErrorClass::NotFound
            } else if code.ends_with(".Malformed") {
                ErrorClass::InvalidInput
            } else {
                ErrorClass::Other
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_fall_into_their_classes() {
        let cases = [
            ("InvalidAMIID.NotFound", ErrorClass::NotFound),
            ("InvalidSubnetID.NotFound", ErrorClass::NotFound),
            ("InvalidVpcID.NotFound", ErrorClass::NotFound),
            ("NoSuchEntity", ErrorClass::NotFound),
            (
                "InvalidLaunchTemplateName.AlreadyExistsException",
                ErrorClass::AlreadyExists,
            ),
            ("RequestLimitExceeded", ErrorClass::Throttled),
            ("ThrottlingException", ErrorClass::Throttled),
            (
                "InsufficientInstanceCapacity",
                ErrorClass::InsufficientCapacity,
            ),
            ("SpotMaxPriceTooLow", ErrorClass::InsufficientCapacity),
            ("UnauthorizedOperation", ErrorClass::Unauthorized),
            ("AccessDenied", ErrorClass::Unauthorized),
            (
                "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
                ErrorClass::Unauthorized,
            ),
            ("InvalidParameterValue", ErrorClass::InvalidInput),
            ("InvalidKeyPair.Malformed", ErrorClass::InvalidInput),
            ("IdempotentParameterMismatch", ErrorClass::InvalidInput),
            ("InvalidInstanceType", ErrorClass::NotFound),
            // What StartInstances and StopInstances answer besides the common codes.
            ("IncorrectInstanceState", ErrorClass::IncorrectState),
            ("OperationNotPermitted", ErrorClass::IncorrectState),
            ("UnsupportedOperation", ErrorClass::InvalidInput),
            ("InvalidInstanceID.NotFound", ErrorClass::NotFound),
            ("InvalidInstanceID.Malformed", ErrorClass::InvalidInput),
            ("InstanceLimitExceeded", ErrorClass::InsufficientCapacity),
            ("VcpuLimitExceeded", ErrorClass::InsufficientCapacity),
            ("SomethingNew", ErrorClass::Other),
        ];
        for (code, class) in cases {
            assert_eq!(classify(code), class, "{code}");
        }
    }

    #[test]
    fn a_missing_spot_service_linked_role_is_told_apart_from_other_refusals() {
        let cases = [
            (
                "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
                "The provided credentials do not have permission to create the service-linked \
                 role for EC2 Spot Instances.",
                true,
            ),
            (
                "UnauthorizedOperation",
                "You are not authorized to use the service-linked role AWSServiceRoleForEC2Spot.",
                true,
            ),
            (
                "UnauthorizedOperation",
                "You are not authorized to perform this operation.",
                false,
            ),
            (
                "AuthFailure",
                "AWS was not able to validate the credentials.",
                false,
            ),
        ];
        for (code, message, wanted) in cases {
            let e = CloudError::new("CreateFleet", code, message);
            assert_eq!(
                e.wants_spot_service_linked_role(),
                wanted,
                "{code}: {message}"
            );
        }
    }

    #[test]
    fn no_code_is_listed_twice() {
        let mut seen = std::collections::HashSet::new();
        for (_, codes) in TABLE {
            for code in *codes {
                assert!(seen.insert(code), "{code} is in two classes");
            }
        }
    }
}
