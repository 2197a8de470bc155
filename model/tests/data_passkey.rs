//! The passkey retrieval task and its accuracy.

use fpdt_model::data::IGNORE_INDEX;
use fpdt_model::passkey::{
    argmax_rows, PasskeyGen, PasskeyScore, PasskeyTask, ANSWER, BOS, DIGIT0, END_KEY, FILLER0, KEY,
    QUERY,
};
use fpdt_model::SplitMix64;

#[test]
fn the_key_is_hidden_once_and_only_the_answer_is_a_target() {
    let task = PasskeyTask::new(2048, 5, 256).expect("task");
    let mut g = PasskeyGen::new(task, 3);
    let mut depths = Vec::new();
    for _ in 0..50 {
        let p = g.next_sample();
        let (t, l) = (&p.sample.tokens, &p.sample.labels);
        assert_eq!(t.len(), 2048);
        assert_eq!(l.len(), 2048);
        assert_eq!(t[0], BOS);
        assert!(t.iter().all(|&x| (x as usize) < 256));
        assert_eq!(t.iter().filter(|&&x| x == KEY).count(), 1);
        assert_eq!(t[p.key_at], KEY);
        for (i, &d) in p.key.iter().enumerate() {
            assert!(d < 10);
            assert_eq!(t[p.key_at + 1 + i], DIGIT0 + d);
        }
        assert_eq!(t[p.key_at + 6], END_KEY);
        assert_eq!(t[2048 - 6], QUERY);
        assert_eq!(t[2048 - 5], ANSWER);
        // Targets: the k answer digits at the last k positions.
        let targets: Vec<(usize, i32)> = l
            .iter()
            .enumerate()
            .filter(|(_, &x)| x != IGNORE_INDEX)
            .map(|(i, &x)| (i, x))
            .collect();
        assert_eq!(targets.len(), 5);
        for (j, (i, x)) in targets.iter().enumerate() {
            assert_eq!(*i, 2048 - 5 + j);
            assert_eq!(*x as u32, DIGIT0 + p.key[j]);
        }
        // The inputs that precede targets are the answer so far (teacher forcing).
        for j in 1..5 {
            assert_eq!(t[2048 - 5 + j], DIGIT0 + p.key[j - 1]);
        }
        // Elsewhere: filler.
        assert!(t[1..p.key_at].iter().all(|&x| x >= FILLER0));
        depths.push(p.key_at);
    }
    let min = depths.iter().min().copied().unwrap_or(0);
    let max = depths.iter().max().copied().unwrap_or(0);
    assert!(
        max - min > 1000,
        "depths spread over the context: {min}..{max}"
    );
}

#[test]
fn generation_is_seeded_and_resumable() {
    let task = PasskeyTask::new(256, 4, 96).expect("task");
    let mut a = PasskeyGen::new(task, 9);
    let mut b = PasskeyGen::new(task, 9);
    let mut c = PasskeyGen::new(task, 10);
    let (x, y, z) = (a.next_sample(), b.next_sample(), c.next_sample());
    assert_eq!(x, y);
    assert_ne!(x, z);
    let state = a.state();
    let after: Vec<_> = (0..5).map(|_| a.next_sample()).collect();
    let mut r = PasskeyGen::new(task, 0);
    r.restore(state);
    let again: Vec<_> = (0..5).map(|_| r.next_sample()).collect();
    assert_eq!(after, again);
}

#[test]
fn fixed_depths_reach_both_ends() {
    let task = PasskeyTask::new(64, 4, 96).expect("task");
    let mut rng = SplitMix64(1);
    let first = task.sample(&mut rng, Some(0.0));
    assert_eq!(first.key_at, 1);
    let last = task.sample(&mut rng, Some(1.0));
    assert_eq!(last.sample.tokens[last.key_at + 5], END_KEY);
    assert_eq!(
        last.key_at + 6,
        64 - 5,
        "the key block ends right before the query"
    );
    let shortest = PasskeyTask::new(PasskeyTask::min_seq_len(4), 4, 96).expect("task");
    let s = shortest.sample(&mut rng, None);
    assert_eq!(s.key_at, 1);
}

#[test]
fn bad_tasks_name_the_flag() {
    let e = PasskeyTask::new(10, 4, 256)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("--seq-len") && e.contains("at least 12"), "{e}");
    let e = PasskeyTask::new(100, 0, 256)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("--passkey-digits"), "{e}");
    let e = PasskeyTask::new(100, 4, 17)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("vocab_size"), "{e}");
}

#[test]
fn accuracy_counts_digits_and_whole_keys() {
    let task = PasskeyTask::new(128, 4, 96).expect("task");
    let mut g = PasskeyGen::new(task, 5);
    let p = g.next_sample();
    let labels = &p.sample.labels;
    // Perfect predictions (argmax of one-hot logits at the labels).
    let vocab = 96;
    let mut logits = vec![0f32; 128 * vocab];
    for (t, &l) in labels.iter().enumerate() {
        let target = if l == IGNORE_INDEX { 0 } else { l as usize };
        logits[t * vocab + target] = 1.0;
    }
    let pred = argmax_rows(&logits, vocab);
    let mut score = PasskeyScore::default();
    score.add(labels, &pred);
    assert_eq!(score.digit_accuracy(), 1.0);
    assert_eq!(score.key_accuracy(), 1.0);

    // One digit wrong: 3/4 of the digits, no key.
    let mut wrong = pred.clone();
    let last = 127;
    wrong[last] = if wrong[last] == DIGIT0 {
        DIGIT0 + 1
    } else {
        DIGIT0
    };
    let mut s2 = PasskeyScore::default();
    s2.add(labels, &wrong);
    assert_eq!(s2.digits_correct, 3);
    assert_eq!(s2.keys_correct, 0);
    score.merge(&s2);
    assert_eq!(score.digits, 8);
    assert_eq!(score.keys, 2);
    assert!((score.digit_accuracy() - 7.0 / 8.0).abs() < 1e-12);
    assert_eq!(score.key_accuracy(), 0.5);
    // Predictions off the answer do not count.
    let mut noise = pred;
    noise[0] = 55;
    let mut s3 = PasskeyScore::default();
    s3.add(labels, &noise);
    assert_eq!(s3.key_accuracy(), 1.0);
    assert_eq!(PasskeyScore::default().digit_accuracy(), 0.0);
}
