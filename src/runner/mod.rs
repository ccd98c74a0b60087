//! The instance side: how a launched instance proves who it is ([`identity`], against AWS's
//! certificates in [`aws_certificates`]) and the tokens it calls back with ([`token`]), under the
//! key that also seals its bootstrap answer. The boot script that uses them is
//! [`crate::domain::userdata`]; the endpoints are in `crate::http`.

pub mod aws_certificates;
pub mod identity;
pub mod release;
pub mod token;
