//! Building this crate needs the `bpf-linker` binary, a dependency cargo cannot see; rebuild when
//! it changes. (`cargo xtask setup` installs it.)

fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(error) => {
            println!("cargo:warning=bpf-linker not found ({error}); run `cargo xtask setup`");
        }
    }
}
