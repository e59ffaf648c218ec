//! MicroVM sandboxes: a sandbox is a virtual machine with its own kernel,
//! the strongest boundary StacyVM offers.
//!
//! - [`assets`] builds what a VM boots: the kernel (a distribution's, e.g.
//!   Debian's `linux-image-cloud-amd64`), an initramfs holding the guest
//!   agent as `/init` and the kernel modules it needs, and a root disk
//!   (ext4) made from an image of the local image store, cached per image.
//! - The guest agent (`agent/`, `stacyvm-agent` run as `/init`) mounts the
//!   disk as the root, then serves exec and files over one multiplexed
//!   stream (`stacyvm_agent`'s protocol, request ids on every frame).
//! - [`link`] is the host's end of that stream: one per VM, several
//!   commands and file operations at once.
//! - [`qemu`] is the `qemu` provider (`-M microvm`, KVM or TCG).

pub mod assets;
pub mod firecracker;
pub mod link;
pub mod machine;
pub mod qemu;
