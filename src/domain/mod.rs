//! Pure decisions: no I/O, no clocks. Everything here is a function of its arguments.

pub mod cost;
pub mod gc;
pub mod job;
pub mod launch;
pub mod matching;
pub mod pool;
pub mod tenancy;
pub mod userdata;
pub mod warm;
