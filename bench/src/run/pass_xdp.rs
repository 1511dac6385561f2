//! A pass-through XDP program (`r0 = XDP_PASS; exit`), built in memory as a minimal ELF object
//! and attached to `fw`'s external interface for the "plain forwarding with XDP" arm: what veth
//! charges for any attached XDP program (it copies every skb), without any of the gateway's work.

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{Xdp, XdpMode},
};
use object::{
    Architecture, BinaryFormat, Endianness, SectionKind, SymbolFlags, SymbolKind, SymbolScope,
    write::{Object, Symbol, SymbolSection},
};
use testbed::Netns;

const PROGRAM: &str = "bench_pass";
/// `mov64 r0, 2` (`XDP_PASS`), `exit`.
const CODE: [u8; 16] = [
    0xb7, 0, 0, 0, 2, 0, 0, 0, //
    0x95, 0, 0, 0, 0, 0, 0, 0,
];

/// The ELF object aya loads: one program in section `xdp` and a license.
fn elf() -> Result<Vec<u8>> {
    let mut object = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
    let text = object.add_section(Vec::new(), b"xdp".to_vec(), SectionKind::Text);
    let offset = object.append_section_data(text, &CODE, 8);
    object.add_symbol(Symbol {
        name: PROGRAM.as_bytes().to_vec(),
        value: offset,
        size: CODE.len() as u64,
        kind: SymbolKind::Text,
        scope: SymbolScope::Dynamic,
        weak: false,
        section: SymbolSection::Section(text),
        flags: SymbolFlags::None,
    });
    let license = object.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
    object.append_section_data(license, b"GPL\0", 1);
    object.write().context("write the pass-through XDP object")
}

/// The program attached to `interface` in `ns` (driver mode, as the gate would be); dropping
/// it detaches the program.
pub struct PassXdp {
    _ebpf: Ebpf,
}

impl PassXdp {
    pub fn attach(ns: &Netns, interface: &str) -> Result<Self> {
        let bytes = elf()?;
        let interface = interface.to_owned();
        let ebpf = ns.run(move || -> Result<Ebpf> {
            let mut ebpf = EbpfLoader::new()
                .load(&bytes)
                .context("load the pass-through XDP object")?;
            let program: &mut Xdp = ebpf
                .program_mut(PROGRAM)
                .context("the pass-through program")?
                .try_into()?;
            program
                .load()
                .context("the verifier on the pass-through program")?;
            program
                .attach(&interface, XdpMode::Driver)
                .with_context(|| format!("attach the pass-through XDP program to {interface}"))?;
            Ok(ebpf)
        })??;
        Ok(Self { _ebpf: ebpf })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aya_finds_the_xdp_program_in_the_object() {
        let ebpf = EbpfLoader::new().load(&elf().unwrap()).unwrap();
        let program = ebpf.program(PROGRAM).expect("the program is in the object");
        assert!(matches!(program, aya::programs::Program::Xdp(_)));
    }
}
