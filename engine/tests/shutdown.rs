//! Closing an engine releases everything: no descriptor, thread or ring file outlives it.
//! (Its own test binary, so no other test opens descriptors or threads meanwhile.)

use intergroup_engine::runtime::{BackendKind, Engine, EngineConfig, GroupConfig};
use intergroup_engine::MemberConfig;

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// The names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn ring_files() -> usize {
    let mine = format!("intergroup-pub-{}-", std::process::id());
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&mine))
                .count()
        })
        .unwrap_or(0)
}

fn cycle(backend: BackendKind, invoker: bool, port: u16) {
    let e = Engine::launch(EngineConfig {
        backend,
        invoker,
        workers: if invoker { 1 } else { 2 },
        ..EngineConfig::default()
    })
    .unwrap();
    for (group, member) in [(3u32, 1u32), (4, 1)] {
        let mut g = GroupConfig::new(MemberConfig {
            group,
            member_id: member,
            ..MemberConfig::default()
        });
        g.udp.group.set_port(port + group as u16);
        e.join(g).unwrap();
        e.subscribe(group, |_| {}).unwrap();
        let mut p = e.publication(group, 1).unwrap();
        p.offer(b"bye").unwrap();
        e.invoke();
    }
    e.close();
}

#[test]
fn closing_engines_leaves_no_descriptors_threads_or_files() {
    let port = 46_900 + (std::process::id() % 20) as u16 * 5;
    // One cycle first: lazily created process-wide state is not a leak.
    cycle(BackendKind::Auto, false, port);
    let (fds, threads) = (count("/proc/self/fd"), count("/proc/self/task"));
    for i in 0..10 {
        let backend = if i % 2 == 0 {
            BackendKind::IoUring
        } else {
            BackendKind::Portable
        };
        cycle(backend, i % 3 == 0, port);
    }
    assert_eq!(count("/proc/self/fd"), fds, "descriptors leaked");
    // The engine joins its own threads in `close`; io_uring's kernel workers (`iou-wrk-*`) of
    // a closed ring leave on their own a moment later. Wait for that (up to 10 s; a thread
    // still there then is a leak), and name whatever is left.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count("/proc/self/task") != threads && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(
        count("/proc/self/task"),
        threads,
        "threads leaked: {:?}",
        thread_names()
    );
    assert_eq!(ring_files(), 0, "publication ring files left in /dev/shm");
}
