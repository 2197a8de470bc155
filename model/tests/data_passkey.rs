//! The passkey retrieval task and its accuracy.

use fpdt_model::data::IGNORE_INDEX;
use fpdt_model::passkey::{
    argmax_rows, PasskeyGen, PasskeyScore, PasskeyTask, ANSWER, BOS, DIGIT0, END_KEY, KEY, QUERY,
};
use fpdt_model::SplitMix64;

#[test]
fn the_key_is_hidden_once_and_only_the_answers_are_targets() {
    let (s, k, answers) = (2048, 5, 3);
    let task = PasskeyTask::new(s, k, 256, answers).expect("task");
    assert_eq!(task.filler0(), DIGIT0 + 50);
    let mut g = PasskeyGen::new(task, 3);
    let mut depths = Vec::new();
    for _ in 0..50 {
        let p = g.next_sample();
        let (t, l) = (&p.sample.tokens, &p.sample.labels);
        assert_eq!(t.len(), s);
        assert_eq!(l.len(), s);
        assert_eq!(t[0], BOS);
        assert!(t.iter().all(|&x| (x as usize) < 256));
        assert_eq!(t.iter().filter(|&&x| x == KEY).count(), 1);
        assert_eq!(t[p.key_at], KEY);
        // Digit d of place i is its own token.
        for (i, &d) in p.key.iter().enumerate() {
            assert!(d < 10);
            assert_eq!(t[p.key_at + 1 + i], DIGIT0 + 10 * i as u32 + d);
            assert_eq!(PasskeyTask::digit_token(i, d), DIGIT0 + 10 * i as u32 + d);
        }
        assert_eq!(t[p.key_at + 1 + k], END_KEY);
        let query_at = s - answers * (k + 1);
        assert_eq!(t[query_at], QUERY);
        assert_eq!(t.iter().filter(|&&x| x == QUERY).count(), 1);
        // The answers: ANSWER and the key's digit tokens, `answers` times;
        // the last digit of the last answer is the last label only.
        for a in 0..answers {
            let first = query_at + 1 + a * (k + 1);
            assert_eq!(t[first], ANSWER);
            for i in 0..k {
                if first + 1 + i < s {
                    assert_eq!(t[first + 1 + i], PasskeyTask::digit_token(i, p.key[i]));
                }
            }
        }
        // Targets: every answer digit (the label at t is token t + 1).
        let targets: Vec<(usize, i32)> = l
            .iter()
            .enumerate()
            .filter(|(_, &x)| x != IGNORE_INDEX)
            .map(|(i, &x)| (i, x))
            .collect();
        assert_eq!(targets.len(), answers * k);
        for (n, (i, x)) in targets.iter().enumerate() {
            let (a, j) = (n / k, n % k);
            assert_eq!(*i, query_at + 1 + a * (k + 1) + j);
            assert_eq!(*x as u32, PasskeyTask::digit_token(j, p.key[j]));
        }
        // The retrieval keeps the first answer's targets only.
        let r = p.retrieval();
        assert_eq!(r.tokens, *t);
        let kept: Vec<usize> = (0..s).filter(|&i| r.labels[i] != IGNORE_INDEX).collect();
        assert_eq!(kept, p.first_answer.clone().collect::<Vec<_>>());
        assert_eq!(kept.len(), k);
        for &i in &kept {
            assert_eq!(r.labels[i], l[i]);
        }
        // Before the key and between it and the query: filler only.
        let filler = |x: u32| x >= task.filler0() && (x as usize) < 256;
        assert!(t[1..p.key_at].iter().all(|&x| filler(x)));
        assert!(t[p.key_at + k + 2..query_at].iter().all(|&x| filler(x)));
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
fn one_stream_serves_every_warmup_length() {
    let task = PasskeyTask::new(256, 4, 96, 2).expect("task");
    let short = task.with_seq_len(64).expect("shorter");
    assert_eq!((short.digits, short.answers, short.seq_len), (4, 2, 64));
    let mut a = PasskeyGen::new(task, 4);
    let mut b = PasskeyGen::new(task, 4);
    let x = a.next_sample_of(&short);
    assert_eq!(x.sample.tokens.len(), 64);
    assert_eq!(x, b.next_sample_of(&short));
    // Both streams continue alike at the full length.
    assert_eq!(a.next_sample(), b.next_sample());
    let e = task
        .with_seq_len(17)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains("--seq-len") && e.contains("at least 18"), "{e}");
}

#[test]
fn generation_is_seeded_and_resumable() {
    let task = PasskeyTask::new(256, 4, 96, 8).expect("task");
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
    let task = PasskeyTask::new(64, 4, 96, 2).expect("task");
    let mut rng = SplitMix64(1);
    let first = task.sample(&mut rng, Some(0.0));
    assert_eq!(first.key_at, 1);
    let last = task.sample(&mut rng, Some(1.0));
    assert_eq!(last.sample.tokens[last.key_at + 5], END_KEY);
    assert_eq!(
        last.key_at + 6,
        64 - 2 * 5,
        "the key block ends right before the query"
    );
    assert_eq!(last.sample.tokens[64 - 2 * 5], QUERY);
    assert_eq!(PasskeyTask::min_seq_len(4, 2), 18);
    let shortest = PasskeyTask::new(PasskeyTask::min_seq_len(4, 2), 4, 96, 2).expect("task");
    let s = shortest.sample(&mut rng, None);
    assert_eq!(s.key_at, 1);
}

#[test]
fn bad_tasks_name_the_flag() {
    let err =
        |r: fpdt_model::Result<PasskeyTask>| r.err().map(|e| e.to_string()).unwrap_or_default();
    let e = err(PasskeyTask::new(12, 4, 256, 1));
    assert!(e.contains("--seq-len") && e.contains("at least 13"), "{e}");
    let e = err(PasskeyTask::new(47, 4, 256, 8));
    assert!(e.contains("--seq-len") && e.contains("at least 48"), "{e}");
    assert!(PasskeyTask::new(48, 4, 256, 8).is_ok());
    let e = err(PasskeyTask::new(100, 0, 256, 1));
    assert!(e.contains("--passkey-digits"), "{e}");
    let e = err(PasskeyTask::new(100, 4, 256, 0));
    assert!(e.contains("--passkey-answers"), "{e}");
    // 4 places of 10 digit tokens after the 7 marker ids: 47 ids, no filler.
    let e = err(PasskeyTask::new(100, 4, 47, 1));
    assert!(
        e.contains("--passkey-digits") && e.contains("vocabulary of 47"),
        "{e}"
    );
    assert!(PasskeyTask::new(100, 4, 48, 1).is_ok());
}

#[test]
fn accuracy_counts_digits_and_whole_keys() {
    let task = PasskeyTask::new(128, 4, 96, 1).expect("task");
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
