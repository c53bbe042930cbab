//! gpod: the Unix-socket daemon serving many clients over one loaded model — generation, forks,
//! step values, evaluation, and queued GPO training runs with progress events. See [`protocol`]
//! for the wire format.

pub mod client;
pub mod protocol;
pub mod server;
pub mod socket;
pub mod trust;

pub use server::{serve, DaemonConfig};
