//! secretd broker

pub mod name;
pub mod policy;
