//! Cutting an ordered batch into runs bounded by encoded size, for whatever leaves in one
//! piece: replayed messages per Push frame (`session`), client sends per forward call
//! (`forward`), one recipient's pushed messages per Push frame (`push`).

/// Largest Push frame of several messages the server builds (replay and merged pushes):
/// well under any client's frame limit, and large enough that per-frame costs (queue slot,
/// write, Ack) are spread over many messages.
pub(crate) const PUSH_FRAME_BYTES: usize = 32 * 1024;

/// `items` in order, cut into runs whose `size`s add up to at most `max` (an item larger than
/// that goes alone, never dropped).
pub(crate) fn split_by_size<T>(
    items: impl IntoIterator<Item = T>,
    max: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    let mut total = 0;
    for item in items {
        let len = size(&item);
        if !run.is_empty() && total + len > max {
            runs.push(std::mem::take(&mut run));
            total = 0;
        }
        total += len;
        run.push(item);
    }
    if !run.is_empty() {
        runs.push(run);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_keep_order_and_bound_size() {
        let runs = split_by_size([4, 5, 20, 1, 1, 9], 10, |n| *n);
        assert_eq!(runs, [vec![4, 5], vec![20], vec![1, 1], vec![9]]);
        assert!(split_by_size(Vec::<usize>::new(), 10, |n| *n).is_empty());
    }
}
