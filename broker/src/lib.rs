//! secretd broker
