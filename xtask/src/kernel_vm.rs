//! `cargo xtask test --kernel debian12`: run integration tests on another kernel than the host's,
//! booted in qemu. Debian 12's kernel package comes from the Debian archive (`apt-get download`),
//! is unpacked and indexed (`depmod`) once under `target/kernel-vm/`, and boots with a small
//! initramfs built here: busybox loads the virtio and 9p modules, mounts the host's root file
//! system read-only over virtio-9p and `switch_root`s into it, so the guest runs the host's
//! iproute2, nsenter, bpftool, Python, Dante and the test executables built on the host. A
//! second, writable 9p share (the run directory) carries each test file's exit status back; the
//! serial console carries the output. The host kills qemu (by pid) when the guest overruns its
//! time.
//!
//! The guest's second stage (a shell script of the host's `/bin/sh`) puts fresh file systems over
//! the places the tests write (`/tmp`, `/run`, `/sys/fs/bpf`, ...) and points the kernel's module
//! loader at a wrapper calling the host's `modprobe` on the unpacked package (`modprobe -d`), so
//! veth, `sch_ingress`, `cls_bpf` and the rest load on demand as on an installed system.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::setup::{self, workspace_root};

/// Debian packages the VM run needs on the host: qemu, a static busybox for the initramfs, kmod
/// for `depmod` (the kernel package ships no `modules.dep`) and the guest's `modprobe`.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "kmod"];

/// The integration test files run in the VM by default: the data-path `test_run` tests and the
/// gate and relay tests, which are what differs between kernels.
pub const DEFAULT_VM_TESTS: &[&str] = &[
    "datapath",
    "xdp_gate",
    "kernel_relay",
    "no_way_in",
    "enhanced_testbed",
    "raw_testbed",
];

/// Modules the initramfs loads (with their dependencies) to mount the host's root over 9p.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// How the guest's CPU runs, and what that means for its time limits.
#[derive(Clone, Copy)]
enum Accel {
    Kvm,
    /// Software emulation: about 15 times slower than the host.
    Tcg,
}

impl Accel {
    /// `GATEWAY_TEST_TIME_SCALE` for the tests: how much longer their waits may take.
    fn time_scale(self) -> u32 {
        match self {
            Self::Kvm => 2,
            Self::Tcg => 20,
        }
    }

    /// The most one test file may take inside the guest (coreutils `timeout`).
    fn per_file_timeout(self) -> Duration {
        match self {
            Self::Kvm => Duration::from_mins(10),
            Self::Tcg => Duration::from_mins(40),
        }
    }

    /// The whole VM's time limit when `--vm-timeout` is not given.
    fn default_vm_timeout(self) -> Duration {
        match self {
            Self::Kvm => Duration::from_mins(30),
            Self::Tcg => Duration::from_hours(2),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Kvm => "KVM",
            Self::Tcg => "TCG",
        }
    }
}

/// Mount tags of the two 9p shares.
const ROOT_TAG: &str = "hostroot";
const OUT_TAG: &str = "vmout";

/// Which kernel to boot.
pub enum Kernel {
    /// Debian 12's `linux-image-amd64` (6.1), fetched from the Debian archive.
    Debian12,
    /// A Debian `linux-image-*` package on disk.
    Deb(PathBuf),
}

pub struct Options<'a> {
    pub kernel: Kernel,
    pub filter: Option<&'a str>,
    /// The VM's time limit; `None`: a default for the accelerator.
    pub timeout: Option<Duration>,
}

/// An unpacked kernel package: the extracted tree, its release (`uname -r`) and its image.
struct KernelTree {
    root: PathBuf,
    release: String,
    vmlinuz: PathBuf,
    package: String,
    version: String,
}

/// What one test file did in the guest.
struct FileResult {
    name: String,
    status: Option<i32>,
    summary: Option<String>,
}

fn cache_dir() -> PathBuf {
    workspace_root().join("target/kernel-vm")
}

fn log(message: &str) {
    println!("kernel-vm: {message}");
}

pub fn run(options: &Options<'_>) -> Result<()> {
    let started = Instant::now();
    setup::ensure_packages(VM_PACKAGES, "the kernel VM")?;

    let deb = match &options.kernel {
        Kernel::Debian12 => download_debian12()?,
        Kernel::Deb(path) => path
            .canonicalize()
            .with_context(|| format!("--kernel-deb {}: no such file", path.display()))?,
    };
    let kernel = unpack(&deb)?;
    log(&format!(
        "kernel {} ({} {})",
        kernel.release, kernel.package, kernel.version
    ));

    let names = selected_tests(options.filter)?;
    log("building the gateway and the test executables on the host");
    crate::cargo::cargo(&["build", "--locked", "--bins", "--examples"])?;
    let executables = build_test_executables(&names)?;

    let run_dir = cache_dir().join("last-run");
    if run_dir.exists() {
        fs::remove_dir_all(&run_dir).with_context(|| format!("remove {}", run_dir.display()))?;
    }
    fs::create_dir_all(run_dir.join("status"))
        .with_context(|| format!("create {}", run_dir.display()))?;
    let accel = match kvm_usable() {
        Ok(()) => Accel::Kvm,
        Err(why) => {
            log(&format!(
                "no KVM ({why}): software emulation (TCG), about 15 times slower; the tests' waits \
                 are stretched {} times",
                Accel::Tcg.time_scale()
            ));
            Accel::Tcg
        }
    };
    write_stage2(&run_dir, &kernel, &executables, accel)?;
    let initramfs = run_dir.join("initramfs.cpio");
    build_initramfs(&kernel, &run_dir, &initramfs)?;

    let booted = Instant::now();
    let timeout = options
        .timeout
        .unwrap_or_else(|| accel.default_vm_timeout());
    let console = boot(&kernel, &initramfs, &run_dir, accel, timeout)?;
    let vm_seconds = booted.elapsed().as_secs();

    let results = collect_results(&run_dir, &names, &console);
    let guest_kernel = fs::read_to_string(run_dir.join("kernel")).map_or_else(
        |_| "unknown (the guest did not say)".to_owned(),
        |text| text.trim().to_owned(),
    );
    let mut summary = format!(
        "kernel-vm: results on {guest_kernel} (Debian package {} {}):\n",
        kernel.package, kernel.version
    );
    let mut failed = Vec::new();
    for result in &results {
        let verdict = match result.status {
            Some(0) => "ok",
            Some(_) => "FAILED",
            None => "NOT RUN",
        };
        if result.status != Some(0) {
            failed.push(result.name.clone());
        }
        let _ = writeln!(
            summary,
            "  {:<18} {:<8} {}",
            result.name,
            verdict,
            result
                .summary
                .as_deref()
                .unwrap_or("(no libtest summary line)")
        );
    }
    let total = started.elapsed().as_secs();
    let _ = writeln!(
        summary,
        "kernel-vm: {} in {total} s (of which the VM {vm_seconds} s)",
        if failed.is_empty() {
            "all passed".to_owned()
        } else {
            format!("{} of {} file(s) failed", failed.len(), results.len())
        }
    );
    print!("{summary}");
    let _ = fs::write(run_dir.join("summary.txt"), &summary);
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "on {guest_kernel}: {} failed; the console log is {}",
            failed.join(", "),
            run_dir.join("console.log").display()
        )
    }
}

fn selected_tests(filter: Option<&str>) -> Result<Vec<String>> {
    let all = crate::test::integration_test_files()?;
    let names: Vec<String> = match filter {
        // Comma-separated: a VM boot is dear, so one run can take several files.
        Some(filter) => all
            .into_iter()
            .filter(|name| filter.split(',').any(|part| name.contains(part.trim())))
            .collect(),
        None => DEFAULT_VM_TESTS
            .iter()
            .map(|&name| name.to_owned())
            .filter(|name| all.contains(name))
            .collect(),
    };
    if names.is_empty() {
        bail!(
            "no integration test file matches --filter {}",
            filter.unwrap_or("")
        );
    }
    Ok(names)
}

fn command_output(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run_status(cmd: &mut Command) -> Result<()> {
    let what = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("run {what}"))?;
    if !status.success() {
        bail!("{what} failed with {status}");
    }
    Ok(())
}

/// The package the candidate `linux-image-amd64` depends on (`linux-image-<abi>-amd64`).
fn linux_image_amd64_target() -> Option<String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-amd64"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("Depends: ")
                .filter(|dep| dep.starts_with("linux-image-"))
                .map(str::to_owned)
        })
}

/// The package `linux-image-amd64` depends on in the host's apt lists, and its version. Updates
/// the lists once when apt does not know the package.
fn debian12_package() -> Result<(String, String)> {
    let package = if let Some(package) = linux_image_amd64_target() {
        package
    } else {
        log("apt does not know linux-image-amd64 yet: apt-get update");
        run_status(
            Command::new("apt-get")
                .args(["-qq", "update"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        linux_image_amd64_target().context(
            "apt knows no linux-image-amd64 (is the Debian archive in /etc/apt/sources.list?)",
        )?
    };
    let show =
        command_output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))?;
    let version = show
        .lines()
        .find_map(|line| line.strip_prefix("Version: "))
        .with_context(|| format!("apt-cache show {package} names no version"))?
        .trim()
        .to_owned();
    if !version.starts_with("6.1.") {
        bail!(
            "linux-image-amd64 here is {package} {version}, not Debian 12's 6.1: this host's apt \
             follows another Debian release. Download a bookworm linux-image-*-amd64 .deb and \
             pass it with --kernel-deb PATH"
        );
    }
    Ok((package, version))
}

/// Debian 12's kernel package, downloaded once into `target/kernel-vm/debs/`.
fn download_debian12() -> Result<PathBuf> {
    let (package, version) = debian12_package()?;
    let debs = cache_dir().join("debs");
    // apt's file name: the epoch's colon is written %3a.
    let file = debs.join(format!(
        "{package}_{}_amd64.deb",
        version.replace(':', "%3a")
    ));
    if file.exists() {
        log(&format!("using the cached {}", file.display()));
        return Ok(file);
    }
    log(&format!(
        "downloading {package} {version} from the Debian archive (about 70 MB)"
    ));
    // Download into a scratch directory and move the finished file, so an interrupted download
    // leaves nothing that looks cached.
    let partial = debs.join(format!("partial-{}", std::process::id()));
    fs::create_dir_all(&partial).with_context(|| format!("create {}", partial.display()))?;
    let result = run_status(
        Command::new("apt-get")
            .args([
                "download",
                "-qq",
                // The download directory is root's; apt's _apt user could not write it.
                "-o",
                "APT::Sandbox::User=root",
                &format!("{package}={version}"),
            ])
            .current_dir(&partial),
    )
    .and_then(|()| {
        let downloaded = fs::read_dir(&partial)?
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
            .context("apt-get download left no .deb")?;
        fs::rename(&downloaded, &file)
            .with_context(|| format!("move {} to {}", downloaded.display(), file.display()))
    });
    let _ = fs::remove_dir_all(&partial);
    result?;
    Ok(file)
}

/// Unpacks `deb` under `target/kernel-vm/kernels/` (once per file: a marker records its size and
/// modification time) and builds `modules.dep`, which the package leaves to its postinst.
fn unpack(deb: &Path) -> Result<KernelTree> {
    let field = |name: &str| -> Result<String> {
        Ok(
            command_output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?
                .trim()
                .to_owned(),
        )
    };
    let package = field("Package").with_context(|| format!("{} is no .deb", deb.display()))?;
    let version = field("Version")?;
    if !package.starts_with("linux-image-") {
        bail!(
            "{} holds the package {package}, not a linux-image-* kernel",
            deb.display()
        );
    }
    let meta = fs::metadata(deb).with_context(|| format!("stat {}", deb.display()))?;
    let stamp = format!("{} {} {}\n", deb.display(), meta.len(), meta.mtime());
    let dir = cache_dir()
        .join("kernels")
        .join(format!("{package}_{version}"));
    let root = dir.join("root");
    let marker = dir.join("unpacked");
    let fresh = fs::read_to_string(&marker).ok().as_deref() == Some(stamp.as_str());
    if fresh {
        log(&format!("using the unpacked {}", root.display()));
    } else {
        log(&format!("unpacking {} and running depmod", deb.display()));
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        run_status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    let modules = root.join("lib/modules");
    let mut releases: Vec<String> = fs::read_dir(&modules)
        .with_context(|| format!("{} has no lib/modules", deb.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect();
    let release = match releases.len() {
        1 => releases.remove(0),
        _ => bail!(
            "expected one kernel release in {}, found {releases:?}",
            modules.display()
        ),
    };
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        bail!("{} has no boot/vmlinuz-{release}", deb.display());
    }
    if !fresh {
        run_status(Command::new("depmod").arg("-b").arg(&root).arg(&release))?;
        fs::write(&marker, &stamp).with_context(|| format!("write {}", marker.display()))?;
    }
    Ok(KernelTree {
        root,
        release,
        vmlinuz,
        package,
        version,
    })
}

/// Builds the integration test executables and returns each file's executable.
fn build_test_executables(names: &[String]) -> Result<Vec<(String, PathBuf)>> {
    let mut args = vec![
        "test",
        "--locked",
        "--package",
        "testbed",
        "--no-run",
        "--message-format=json",
    ];
    for name in names {
        args.extend(["--test", name.as_str()]);
    }
    let out = command_output(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args(&args)
            .current_dir(workspace_root()),
    )?;
    let mut found = BTreeMap::new();
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        if let (Some(name), Some(executable)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            found.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    names
        .iter()
        .map(|name| {
            found
                .remove(name)
                .map(|exe| (name.clone(), exe))
                .with_context(|| format!("cargo built no test executable for `{name}`"))
        })
        .collect()
}

/// Quotes `text` for a POSIX shell.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The guest's second stage, run by the host's `/bin/sh` once the host's root is `/`, and the
/// module loader wrapper it installs.
fn write_stage2(
    run_dir: &Path,
    kernel: &KernelTree,
    tests: &[(String, PathBuf)],
    accel: Accel,
) -> Result<()> {
    let run = sh_quote(path_str(run_dir)?);
    let modprobe = run_dir.join("modprobe");
    fs::write(
        &modprobe,
        format!(
            "#!/bin/sh\n# The kernel's module loader in the guest: the host's modprobe on the \
             unpacked package.\nexec /sbin/modprobe -d {} \"$@\"\n",
            sh_quote(path_str(&kernel.root)?)
        ),
    )
    .with_context(|| format!("write {}", modprobe.display()))?;
    set_executable(&modprobe)?;

    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let gateway_bin = workspace_root().join("target/debug/gateway");
    let mut script = format!(
        r#"#!/bin/sh
# Second stage of the kernel VM (written by cargo xtask test --kernel): the host's root is /.
export PATH={path} HOME=/root GATEWAY_BIN={gateway_bin} LANG=C.UTF-8
export GATEWAY_TEST_TIME_SCALE={scale}
say() {{ echo "gateway-vm: $*"; }}
die() {{ say "FATAL: $*"; echo o > /proc/sysrq-trigger; sleep 60; }}
mount -t proc proc /proc || die "mount /proc"
mount -t sysfs sysfs /sys || die "mount /sys"
mount -t devtmpfs devtmpfs /dev || die "mount /dev"
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
for dir in /tmp /run /var/tmp /var/log /var/cache /var/lib; do
    mount -t tmpfs -o mode=0755 tmpfs "$dir" || die "mount tmpfs on $dir"
done
chmod 1777 /tmp /var/tmp
mkdir -p /run/lock /run/netns
mount -t bpf bpf /sys/fs/bpf || die "mount bpffs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {OUT_TAG} {run} || die "mount the result share"
echo {run}/modprobe > /proc/sys/kernel/modprobe
hostname gateway-vm
ip link set lo up
# The open-file limit of a host under systemd (the kernel's own default hard limit is 4096).
ulimit -n 524288 2>/dev/null || say "cannot raise the open-file limit"
uname -r > {run}/kernel
say "running on Linux $(uname -r): $(cat /proc/version)"
cd {root} || die "cd {root}"
"#,
        path = sh_quote(&path),
        gateway_bin = sh_quote(path_str(&gateway_bin)?),
        root = sh_quote(path_str(workspace_root())?),
        scale = accel.time_scale(),
    );
    for (name, exe) in tests {
        let _ = write!(
            script,
            r#"say "begin {name}"
timeout -k 10 {secs} {exe} --test-threads=1 --color never </dev/null
status=$?
echo $status > {run}/status/{name}
say "end {name} status $status"
"#,
            secs = accel.per_file_timeout().as_secs(),
            exe = sh_quote(path_str(exe)?),
        );
    }
    let _ = write!(
        script,
        r#"echo done > {run}/done
sync
say "all files run: powering off"
echo o > /proc/sysrq-trigger
sleep 60
"#
    );
    let stage2 = run_dir.join("stage2.sh");
    fs::write(&stage2, script).with_context(|| format!("write {}", stage2.display()))?;
    set_executable(&stage2)
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .with_context(|| format!("chmod {}", path.display()))
}

/// `modules.dep` of the unpacked kernel: module name to (path, dependencies).
fn modules_dep(kernel: &KernelTree) -> Result<BTreeMap<String, (String, Vec<String>)>> {
    let dir = kernel.root.join("lib/modules").join(&kernel.release);
    let text = fs::read_to_string(dir.join("modules.dep"))
        .with_context(|| format!("read {}/modules.dep", dir.display()))?;
    let name_of = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        file.split(".ko").next().unwrap_or(file).replace('-', "_")
    };
    let mut map = BTreeMap::new();
    for line in text.lines() {
        let Some((module, deps)) = line.split_once(':') else {
            continue;
        };
        map.insert(
            name_of(module),
            (
                module.to_owned(),
                deps.split_whitespace().map(name_of).collect(),
            ),
        );
    }
    Ok(map)
}

/// The modules behind `wanted` in load order (dependencies first), skipping built-in ones.
fn module_load_order(kernel: &KernelTree, wanted: &[&str]) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        if let Some((path, needs)) = deps.get(name) {
            for need in needs {
                visit(need, deps, seen, order);
            }
            order.push(path.clone());
        }
    }
    let deps = modules_dep(kernel)?;
    let builtin = fs::read_to_string(
        kernel
            .root
            .join("lib/modules")
            .join(&kernel.release)
            .join("modules.builtin"),
    )
    .unwrap_or_default();
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for &name in wanted {
        if !deps.contains_key(name) {
            let compiled_in = builtin
                .lines()
                .any(|line| line.ends_with(&format!("/{name}.ko")));
            if compiled_in {
                continue;
            }
            bail!("kernel {} has no module {name}", kernel.release);
        }
        visit(name, &deps, &mut seen, &mut order);
    }
    Ok(order)
}

/// The initramfs: busybox, the 9p modules and `/init`, which mounts the host's root and hands
/// over to the second stage.
fn build_initramfs(kernel: &KernelTree, run_dir: &Path, out: &Path) -> Result<()> {
    let modules = module_load_order(kernel, INITRAMFS_MODULES)?;
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "proc", "sys", "host", "modules"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    let busybox = fs::read("/bin/busybox").context("read /bin/busybox (busybox-static)")?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "mount", "insmod", "switch_root", "sleep", "echo"] {
        cpio.symlink(&format!("bin/{applet}"), "busybox");
    }
    let mut init = String::from(
        "#!/bin/sh\n# First stage of the kernel VM (written by cargo xtask test --kernel).\n\
         export PATH=/bin\n\
         mount -t devtmpfs devtmpfs /dev\n\
         exec </dev/console >/dev/console 2>&1\n\
         die() { echo \"gateway-vm: FATAL: $*\"; echo o > /proc/sysrq-trigger; sleep 60; }\n\
         mount -t proc proc /proc\n\
         echo \"gateway-vm: initramfs on Linux $(cat /proc/sys/kernel/osrelease)\"\n",
    );
    let module_dir = kernel.root.join("lib/modules").join(&kernel.release);
    for module in &modules {
        let file = module.rsplit('/').next().unwrap_or(module);
        let bytes =
            fs::read(module_dir.join(module)).with_context(|| format!("read module {module}"))?;
        cpio.file(&format!("modules/{file}"), 0o644, &bytes);
        let _ = writeln!(init, "insmod /modules/{file} || die \"insmod {file}\"");
    }
    let _ = write!(
        init,
        "tries=0\n\
         until mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 {ROOT_TAG} /host; do\n\
         \x20   tries=$((tries + 1)); [ $tries -lt 50 ] || die \"mount the host's root over 9p\"\n\
         \x20   sleep 0.1\n\
         done\n\
         exec switch_root /host {stage2}\n\
         die \"switch_root\"\n",
        stage2 = sh_quote(path_str(&run_dir.join("stage2.sh"))?),
    );
    cpio.file("init", 0o755, init.as_bytes());
    fs::write(out, cpio.finish()).with_context(|| format!("write {}", out.display()))
}

/// Whether qemu can use KVM for an unmodified kernel: `/dev/kvm` opens and the CPU has
/// hardware virtualization with its KVM module loaded. `/dev/kvm` alone is not enough: a
/// paravirtual KVM such as PVM (`kvm_pvm`, used in nested sandboxes) opens but runs an ordinary
/// kernel by emulating it instruction by instruction, far slower than TCG.
fn kvm_usable() -> Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|error| format!("/dev/kvm: {error}"))?;
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: HashSet<&str> = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .collect();
    let module = if flags.contains("vmx") {
        "kvm_intel"
    } else if flags.contains("svm") {
        "kvm_amd"
    } else {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        return Err(format!(
            "/dev/kvm exists but the CPU shows no vmx/svm{}",
            if pvm {
                " (it is PVM, which cannot run an unmodified kernel at speed)"
            } else {
                ""
            }
        ));
    };
    if Path::new("/sys/module").join(module).exists() {
        Ok(())
    } else {
        Err(format!("{module} is not loaded"))
    }
}

/// Boots the VM, streams its console to stdout and `console.log`, and returns the console text.
/// Kills qemu when it runs longer than `timeout`.
fn boot(
    kernel: &KernelTree,
    initramfs: &Path,
    run_dir: &Path,
    accel: Accel,
    timeout: Duration,
) -> Result<String> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-nodefaults", "-no-reboot", "-display", "none"]);
    match accel {
        Accel::Kvm => qemu.args(["-enable-kvm", "-cpu", "host"]),
        Accel::Tcg => qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"]),
    };
    qemu.args(["-smp", "2", "-m", "2048", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 oops=panic quiet loglevel=4",
            "-virtfs",
            &format!(
                "local,path=/,mount_tag={ROOT_TAG},security_model=none,readonly=on,multidevs=remap"
            ),
            "-virtfs",
            &format!(
                "local,path={},mount_tag={OUT_TAG},security_model=none,multidevs=remap",
                path_str(run_dir)?
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    log(&format!(
        "booting {} in qemu ({}; up to {} s)",
        kernel.release,
        accel.name(),
        timeout.as_secs()
    ));
    let mut child = qemu.spawn().context("start qemu-system-x86_64")?;
    let pid = child.id();
    let stdout = child.stdout.take().context("qemu's stdout")?;
    let log_path = run_dir.join("console.log");
    let (lines_rx, reader) = spawn_console_reader(stdout, &log_path)?;

    let deadline = Instant::now() + timeout;
    let exit = loop {
        while let Ok(line) = lines_rx.try_recv() {
            println!("  vm| {line}");
        }
        if let Some(status) = child.try_wait().context("wait for qemu")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
            println!("  vm| {line}");
        }
    };
    let Some(status) = exit else {
        log(&format!(
            "the guest overran {} s: killing qemu (pid {pid})",
            timeout.as_secs()
        ));
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        bail!(
            "the VM did not finish within {} s; the console log is {}",
            timeout.as_secs(),
            log_path.display()
        );
    };
    let console = reader.join().unwrap_or_default();
    for line in lines_rx.try_iter() {
        println!("  vm| {line}");
    }
    if !status.success() {
        bail!(
            "qemu failed with {status}; the console log is {}",
            log_path.display()
        );
    }
    if !run_dir.join("done").exists() {
        bail!(
            "the guest stopped before running every test (a panic or a failed stage); the console \
             log is {}",
            log_path.display()
        );
    }
    Ok(console)
}

/// Reads qemu's console: each line goes to `log_path` and to the returned channel; the thread
/// returns the whole text at the end of the output.
fn spawn_console_reader(
    stdout: std::process::ChildStdout,
    log_path: &Path,
) -> Result<(mpsc::Receiver<String>, thread::JoinHandle<String>)> {
    let mut log_file =
        fs::File::create(log_path).with_context(|| format!("create {}", log_path.display()))?;
    let (lines_tx, lines_rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        let mut all = String::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\r', '\n']);
                    let _ = writeln!(log_file, "{line}");
                    let _ = lines_tx.send(line.to_owned());
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
        all
    });
    Ok((lines_rx, reader))
}

/// Each file's exit status (from the result share) and libtest summary (from the console).
fn collect_results(run_dir: &Path, names: &[String], console: &str) -> Vec<FileResult> {
    names
        .iter()
        .map(|name| {
            let status = fs::read_to_string(run_dir.join("status").join(name))
                .ok()
                .and_then(|text| text.trim().parse().ok());
            let begin = format!("gateway-vm: begin {name}");
            let end = format!("gateway-vm: end {name} ");
            let summary = console
                .split_once(&begin)
                .and_then(|(_, rest)| rest.split_once(&end).map(|(body, _)| body))
                .and_then(|body| {
                    body.lines()
                        .rev()
                        .find_map(|line| line.trim().strip_prefix("test result: "))
                })
                .map(str::to_owned);
            FileResult {
                name: name.clone(),
                status,
                summary,
            }
        })
        .collect()
}

/// A newc ("070701") cpio archive, the format the kernel unpacks as an initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let size = u32::try_from(data.len()).expect("initramfs entries are far below 4 GiB");
        let name_size = u32::try_from(name.len() + 1).expect("short names");
        let fields = [
            self.inode, mode, 0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            size, 0, // dev major
            0, // dev minor
            rdev.0, rdev.1, name_size, 0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes());
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::{Cpio, sh_quote};

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(sh_quote("/work/a b"), "'/work/a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn cpio_entries_are_aligned_newc() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
        // 110-byte header + "init\0" padded to 116, then 10 bytes of data padded to 12.
        assert_eq!(&bytes[116..126], b"#!/bin/sh\n");
        assert_eq!(&bytes[128..134], b"070701");
    }
}
