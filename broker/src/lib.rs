//! secretd broker

pub mod audit;
pub mod config;
pub mod name;
pub mod policy;
pub mod procfs;
