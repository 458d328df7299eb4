//! The ssh-agent wire protocol (draft-miller-ssh-agent; OpenSSH PROTOCOL.agent).

pub mod frame;
pub mod key;
pub mod message;
pub mod userauth;
