//! Delivery: the rest-hook worker (in progress). What exists: the request's headers and signatures,
//! the success and retry policy, and outbound URL safety.

pub mod headers;
pub mod outbound;
pub mod policy;
pub mod signature;
