//! The driver sandbox, entered for real: this test binary runs itself again as a child
//! process that enters the sandbox for user `nobody` and reports what it can and cannot
//! do (see `ring3d::sandbox::sandbox_check_main`). Needs root; skipped otherwise.
//!
//! It has no test harness (`harness = false`): the harness runs each test on a thread of
//! its own, and capabilities belong to threads, so the child must enter the sandbox on
//! its main thread, before any other thread exists, as a driver process does.

use std::process::{Command, ExitCode};

use ring3d::sandbox::{Expect, Sandbox, SandboxReport, CHECK_MEMLOCK_BYTES};

/// Set in the child: the user whose sandbox it enters.
const CHILD_USER: &str = "RING3D_SANDBOX_TEST_USER";

fn main() -> ExitCode {
    if let Ok(user) = std::env::var(CHILD_USER) {
        return ring3d::sandbox::sandbox_check_main(&user);
    }
    let tests: [(&str, fn()); 2] = [
        (
            "a_driver_process_keeps_nothing_of_root_and_can_still_work",
            a_driver_process_keeps_nothing_of_root_and_can_still_work,
        ),
        (
            "the_check_refuses_root_before_changing_anything",
            the_check_refuses_root_before_changing_anything,
        ),
    ];
    println!("\nrunning {} tests", tests.len());
    let mut failed = 0;
    for (name, test) in tests {
        let outcome = std::panic::catch_unwind(test);
        println!(
            "test {name} ... {}",
            if outcome.is_ok() { "ok" } else { "FAILED" }
        );
        failed += usize::from(outcome.is_err());
    }
    let passed = tests.len() - failed;
    let result = if failed == 0 { "ok" } else { "FAILED" };
    println!("\ntest result: {result}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs this binary again as a child that enters the sandbox for `user`: its exit code,
/// standard output and standard error.
fn run_child(user: &str) -> (Option<i32>, String, String) {
    let exe = std::env::current_exe().expect("the test binary's own path");
    let output = Command::new(exe)
        .env(CHILD_USER, user)
        .output()
        .expect("running the test binary again");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(2) == Some("0"))
    })
}

fn a_driver_process_keeps_nothing_of_root_and_can_still_work() {
    if !is_root() {
        eprintln!("skipped: entering the sandbox needs root");
        return;
    }
    let Ok(nobody) = Sandbox::for_user("nobody", CHECK_MEMLOCK_BYTES) else {
        eprintln!("skipped: this machine has no user nobody");
        return;
    };
    let (code, stdout, stderr) = run_child("nobody");
    let json = stdout
        .find('{')
        .zip(stdout.rfind('}'))
        .map(|(start, end)| &stdout[start..=end])
        .unwrap_or_else(|| panic!("no report; stdout:\n{stdout}\nstderr:\n{stderr}"));
    let report: SandboxReport = serde_json::from_str(json)
        .unwrap_or_else(|error| panic!("{error}: {json}\nstderr:\n{stderr}"));

    assert_eq!(report.problems, Vec::<String>::new(), "stderr:\n{stderr}");
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
    assert_eq!(report.uids, vec![nobody.uid; 4]);
    assert_eq!(report.gids, vec![nobody.gid; 4]);
    assert!(report.groups.is_empty());
    for set in [
        report.cap_inheritable,
        report.cap_permitted,
        report.cap_effective,
        report.cap_bounding,
        report.cap_ambient,
    ] {
        assert_eq!(set, 0, "{report:#?}");
    }
    assert!(report.no_new_privs);
    assert_eq!(report.seccomp_mode, 2);
    assert_eq!(report.seccomp_filters, 2);
    assert_eq!(
        report.memlock,
        Some((CHECK_MEMLOCK_BYTES, CHECK_MEMLOCK_BYTES))
    );

    let outcome = |name: &str| {
        report
            .probes
            .iter()
            .find(|probe| probe.name.starts_with(name))
            .unwrap_or_else(|| panic!("no probe {name:?} in {report:#?}"))
    };
    for name in ["thread spawn", "mmap, mlock", "pipe write and read"] {
        let probe = outcome(name);
        assert_eq!(probe.expect, Expect::Works);
        assert_eq!(probe.errno, None, "{probe:?}");
    }
    for name in ["openat", "socket", "execve", "fork", "kill"] {
        let probe = outcome(name);
        assert_eq!(probe.expect, Expect::Refused);
        assert_eq!(probe.errno, Some(libc::EPERM), "{probe:?}");
    }
}

fn the_check_refuses_root_before_changing_anything() {
    let (code, stdout, stderr) = run_child("root");
    assert_eq!(code, Some(2), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stderr.contains("is root") && stderr.contains("unprivileged user"),
        "{stderr}"
    );
}
