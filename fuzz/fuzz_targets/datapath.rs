//! The differential fuzz of the kernel programs: each input is made into up to 8 hostile frames
//! (`gateway_datapath_model::frames`), each run through the XDP gate, the tc gate with its
//! relay, the tc relay behind the XDP gate and the internal tc program by the kernel
//! (`BPF_PROG_TEST_RUN`, root only) and compared with the model: verdict, counted reasons, frame
//! as left. Any disagreement is a crash. The eBPF object is the one the main workspace built:
//! `GATEWAY_EBPF_OBJECT` names it (`cargo xtask fuzz` sets it). Every [`REPORT_EVERY`] frames
//! it writes "datapath: N frames compared with the model" to stderr, which `cargo xtask fuzz`
//! reads.
#![no_main]

use std::sync::{Mutex, OnceLock};

use arbitrary::Unstructured;
use gateway_datapath_model::{frames, kernel::Kernel, world::World};
use libfuzzer_sys::fuzz_target;

/// Frames made from one input at most.
const FRAMES_PER_INPUT: usize = 8;
/// How often the count of compared frames is written.
const REPORT_EVERY: u64 = 10_000;

fn kernel() -> &'static Mutex<(World, Kernel)> {
    static KERNEL: OnceLock<Mutex<(World, Kernel)>> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let path = std::env::var("GATEWAY_EBPF_OBJECT")
            .expect("GATEWAY_EBPF_OBJECT names the eBPF object (cargo xtask fuzz sets it)");
        let object = std::fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let world = World::standard();
        let kernel = Kernel::load(&object, &world).unwrap_or_else(|e| panic!("{e}"));
        Mutex::new((world, kernel))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut state = kernel().lock().unwrap();
    let (world, kernel) = &mut *state;
    let before = kernel.tally.frames;
    let mut u = Unstructured::new(data);
    for _ in 0..FRAMES_PER_INPUT {
        if u.is_empty() {
            break;
        }
        let Ok(frame) = frames::frame(&mut u, world) else {
            break;
        };
        if let Err(disagreement) = kernel.check(world, &frame) {
            panic!("{disagreement}");
        }
    }
    let frames = kernel.tally.frames;
    if frames / REPORT_EVERY != before / REPORT_EVERY {
        eprintln!("datapath: {frames} frames compared with the model");
    }
});
