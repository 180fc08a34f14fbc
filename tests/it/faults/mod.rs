//! Fault injection and hostile input (issue 8), against real etcd, Apache mod_dav, rclone,
//! tinyproxy and the real binary, a file per kind of fault. In-process servers stand in only
//! where no real server misbehaves on demand; each test asserts the end state exactly. Tests
//! marked "SPEC" assert behaviour the issue asks for that src/ may not have yet.

mod clock;
mod disk;
mod etcd;
mod hostile;
mod kills;
mod load;
mod network;
mod secrets;
mod soak;
