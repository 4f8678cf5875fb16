//! The dynamic batch-size policy of streamed outputs.
//!
//! The first post carries `min` tokens so the first token reaches the client after one token's work;
//! each later post carries `growth` times more, up to `max`, so a long answer needs few HTTP calls.

/// The three knobs, from the environment (`DEFAULT_*`) or a request's overrides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    pub max_batch_size: usize,
    pub min_batch_size: usize,
    pub growth_factor: f64,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self {
            max_batch_size: 50,
            min_batch_size: 1,
            growth_factor: 3.0,
        }
    }
}

impl BatchPolicy {
    /// Starts a sizer for one stream.
    pub(crate) fn sizer(&self) -> BatchSizer {
        let max = self.max_batch_size.max(1);
        let dynamic =
            self.growth_factor > 1.0 && self.min_batch_size >= 1 && max > self.min_batch_size;
        BatchSizer {
            current: if dynamic { self.min_batch_size } else { max },
            max,
            growth_factor: if dynamic { self.growth_factor } else { 1.0 },
        }
    }
}

/// The size of the next post of one stream.
#[derive(Debug, Clone)]
pub(crate) struct BatchSizer {
    current: usize,
    max: usize,
    growth_factor: f64,
}

impl BatchSizer {
    /// Whether `pending` tokens are enough for a post.
    pub(crate) fn is_full(&self, pending: usize) -> bool {
        pending >= self.current
    }

    /// Called after each post.
    pub(crate) fn advance(&mut self) {
        let grown = (self.current as f64 * self.growth_factor).floor();
        self.current = if grown >= self.max as f64 {
            self.max
        } else {
            (grown as usize).max(1)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(policy: BatchPolicy, posts: usize) -> Vec<usize> {
        let mut sizer = policy.sizer();
        (0..posts)
            .map(|_| {
                let size = sizer.current;
                sizer.advance();
                size
            })
            .collect()
    }

    #[test]
    fn defaults_grow_by_three_up_to_fifty() {
        assert_eq!(
            sizes(BatchPolicy::default(), 7),
            vec![1, 3, 9, 27, 50, 50, 50]
        );
    }

    #[test]
    fn custom_knobs() {
        let policy = BatchPolicy {
            max_batch_size: 20,
            min_batch_size: 2,
            growth_factor: 2.0,
        };
        assert_eq!(sizes(policy, 6), vec![2, 4, 8, 16, 20, 20]);
    }

    #[test]
    fn fractional_growth_floors_but_always_grows_from_its_base() {
        let policy = BatchPolicy {
            max_batch_size: 10,
            min_batch_size: 2,
            growth_factor: 1.5,
        };
        assert_eq!(sizes(policy, 6), vec![2, 3, 4, 6, 9, 10]);
    }

    #[test]
    fn no_growth_means_fixed_batches_of_max() {
        let policy = BatchPolicy {
            max_batch_size: 7,
            min_batch_size: 1,
            growth_factor: 1.0,
        };
        assert_eq!(sizes(policy, 3), vec![7, 7, 7]);
    }

    #[test]
    fn min_not_below_max_means_fixed_batches() {
        let policy = BatchPolicy {
            max_batch_size: 5,
            min_batch_size: 5,
            growth_factor: 3.0,
        };
        assert_eq!(sizes(policy, 3), vec![5, 5, 5]);
        let zero_min = BatchPolicy {
            max_batch_size: 4,
            min_batch_size: 0,
            growth_factor: 3.0,
        };
        assert_eq!(sizes(zero_min, 2), vec![4, 4]);
    }

    #[test]
    fn zero_max_still_posts_every_token() {
        let policy = BatchPolicy {
            max_batch_size: 0,
            min_batch_size: 0,
            growth_factor: 3.0,
        };
        assert_eq!(sizes(policy, 2), vec![1, 1]);
    }

    #[test]
    fn is_full_compares_with_the_current_size() {
        let mut sizer = BatchPolicy::default().sizer();
        assert!(!sizer.is_full(0));
        assert!(sizer.is_full(1));
        sizer.advance();
        assert!(!sizer.is_full(2));
        assert!(sizer.is_full(3));
    }
}
