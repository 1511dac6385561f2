//! The differential test of the datapath: seeded hostile frames (VLAN, IPv4 options and
//! fragments, IPv6 extension chains and fragments, truncations, every UDP length, right, wrong
//! and partial checksums) run through the XDP gate, the tc gate with its relay, the tc relay
//! behind the XDP gate (`gateway_inbound`) and the internal tc program by the kernel (`BPF_PROG_TEST_RUN`), each compared with the pure-Rust model
//! (`gateway-datapath-model`): verdict, every counted reason, and the frame as left. Root only.
//! The coverage-guided version of the same comparison is the `datapath` fuzz target.

use gateway_datapath_model::{frames::Seeded, kernel::Kernel, world::World};

/// At least this many frames are compared, with the daemon alive and then with it gone.
const FRAMES: u64 = 100_000;
const FRAMES_WITH_DAEMON_GONE: u64 = 10_000;

fn compare(kernel: &mut Kernel, world: &World, seed: u64, frames: u64) {
    let mut generator = Seeded::new(seed);
    for _ in 0..frames {
        let frame = generator.frame(world);
        if let Err(disagreement) = kernel.check(world, &frame) {
            panic!("seed {seed:#x}: {disagreement}");
        }
    }
    kernel
        .check_all_counters()
        .expect("every counter as the model says");
}

#[test]
fn the_programs_match_the_model_on_hostile_frames() {
    let mut world = World::standard();
    let mut kernel = Kernel::load(gateway::datapath::EBPF_OBJECT, &world).expect("load");
    compare(&mut kernel, &world, 0x6761_7465_7761_7901, FRAMES);
    world.daemon_alive = false;
    kernel.set_daemon_alive(false).unwrap();
    compare(
        &mut kernel,
        &world,
        0x6761_7465_7761_7902,
        FRAMES_WITH_DAEMON_GONE,
    );

    let tally = kernel.tally;
    println!("{tally:#?}");
    assert!(tally.frames >= FRAMES + FRAMES_WITH_DAEMON_GONE);
    // The frames reach every rule: each exit the four programs can take here was taken often.
    for (reason, count) in gateway_common::ExitReason::ALL.iter().zip(tally.per_reason) {
        use gateway_common::ExitReason as R;
        let unreachable_here = matches!(
            reason,
            // Link MTUs (loopback here), helper failures and the fan-out program (not loaded).
            R::TooBigForKernelRelay
                | R::RawTooBigForExternalLink
                | R::KernelRelayFailed
                | R::KernelRelayedMulticast
                | R::KernelRelayedMulticastInside
        );
        if !unreachable_here {
            assert!(count >= 20, "{reason:?} reached by only {count} frames");
        }
    }
    assert!(tally.rewritten >= 1000, "{tally:?}");
}
