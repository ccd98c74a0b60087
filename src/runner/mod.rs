//! The instance side: how a launched instance proves who it is ([`identity`], against AWS's
//! certificates in [`aws_certificates`]), the tokens it calls back with ([`token`]), and where its
//! bootstrap answer waits for it ([`answers`]). The boot script that uses them is
//! [`crate::domain::userdata`]; the endpoints are in `crate::http`.

pub mod answers;
pub mod aws_certificates;
pub mod identity;
pub mod token;
