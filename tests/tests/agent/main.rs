//! End-to-end tests of the agent front end: the real token-agent binary
//! against the real OpenSSH tools (ssh-add, ssh-keygen, ssh, sshd).

// Flags, background start, -k, command mode, configuration errors, help text.
mod cli;
// OpenSSH 10.x flags and signals next to 10.5's ssh-agent: ~/.ssh/agent sockets, -T, -u/-U, -V, SIGUSR1, socket activation.
mod openssh10;
// Keys in and out: ssh-add -l/-L/-d/-D/-t, certificates.
mod keys;
// Hostile and concurrent clients: garbage frames, huge lengths, other uids, floods.
mod robustness;
// Signing: ssh-keygen -Y sign/verify for every key type, sshd logins, ssh-add -h.
mod signing;
// Talking to the person: confirm (-c) through SSH_ASKPASS and pinentry, lock and unlock.
mod prompts;
