//! A signal is honoured while checkpoints are verified: the trainer's handler is installed and
//! SIGTERM is raised in this process (a test binary of its own, so no other test sees it).

mod common;

use common::{SCHEDULE, options, write_config};
use zamba_train::checkpoint;
use zamba_train::signals::StopSignal;
use zamba_train::train::train;

#[test]
fn a_signal_stops_checkpoint_verification_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "run",
        &format!("{SCHEDULE}\n[train]\nsteps = 3\n"),
    );
    train(&options(config)).unwrap();
    let (_, newest) = checkpoint::list(&tmp.path().join("run"))
        .unwrap()
        .pop()
        .unwrap();
    checkpoint::verify(&newest).unwrap();

    let stop = StopSignal::installed().unwrap();
    stop.begin_run(std::time::Duration::from_millis(1));
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !stop.requested() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGTERM never arrived"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let e = format!("{:#}", checkpoint::verify(&newest).unwrap_err());
    assert!(e.contains("interrupted (SIGTERM) while verifying"), "{e}");

    // In a step, waits end once the grace (1 ms here) is over; while a checkpoint is written the
    // first signal does not end them; a second signal ends every wait.
    stop.training_started();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let reason = stop.abort_reason().unwrap();
    assert!(reason.contains("the other ranks did not come"), "{reason}");
    let shield = stop.shield();
    assert_eq!(stop.abort_reason(), None);
    drop(shield);
    nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
    while !stop
        .abort_reason()
        .is_some_and(|r| r.contains("second signal"))
    {
        assert!(std::time::Instant::now() < deadline, "SIGINT never arrived");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
