//! The instance side: how a launched instance proves who it is ([`identity`]) and the tokens
//! it calls back with ([`token`]). The boot script that uses them is
//! [`crate::domain::userdata`]; the endpoints are in `crate::http`.

pub mod identity;
pub mod token;
