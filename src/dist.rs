//! The ranks of a data-parallel training run: one process (the default), or an MPI world when
//! edpo is built with `--features mpi` and started with `mpirun -n N` / `srun`.
//!
//! Training needs only three collectives: sums that every rank gets bit for bit alike
//! (gradients and step totals: reduced to rank 0 in rank order, then broadcast, so replicated
//! optimiser states never drift apart), a gather of byte strings to rank 0 (the pairs'
//! records) and a barrier.

/// The collectives of a training run.
pub trait Ranks {
    /// This process's rank, 0 ≤ rank < size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Sums `values` element-wise over the ranks; every rank ends with the same bits.
    fn sum_f32(&self, values: &mut [f32]);
    /// As `sum_f32`, for f64 values.
    fn sum_f64(&self, values: &mut [f64]);
    /// Rank 0 gets every rank's bytes in rank order; the other ranks get nothing.
    fn gather_to_root(&self, bytes: &[u8]) -> Vec<Vec<u8>>;
    /// Waits for every rank.
    fn barrier(&self);

    /// Whether this rank writes the run folder and prints.
    fn is_root(&self) -> bool {
        self.rank() == 0
    }
}

/// A run of one process.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Ranks for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn size(&self) -> usize {
        1
    }

    fn sum_f32(&self, _values: &mut [f32]) {}

    fn sum_f64(&self, _values: &mut [f64]) {}

    fn gather_to_root(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        vec![bytes.to_vec()]
    }

    fn barrier(&self) {}
}

/// The ranks this process runs among: the MPI world when built with the `mpi` feature (a
/// process started without `mpirun` is a world of one), else a single process.
pub fn ranks() -> Box<dyn Ranks> {
    #[cfg(feature = "mpi")]
    {
        if let Some(world) = mpi_world::MpiWorld::init() {
            return Box::new(world);
        }
    }
    Box::new(SingleProcess)
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use mpi::Count;

    use super::Ranks;

    /// MPI_COMM_WORLD, initialised once per process (finalised when dropped).
    pub struct MpiWorld {
        _universe: Universe,
        world: SimpleCommunicator,
    }

    impl MpiWorld {
        pub fn init() -> Option<MpiWorld> {
            let universe = mpi::initialize()?;
            let world = universe.world();
            Some(MpiWorld {
                _universe: universe,
                world,
            })
        }

        /// Reduce-to-root then broadcast: the same result bits on every rank (an all-reduce
        /// may sum in a different order on different ranks).
        fn sum<T: Equivalence + Copy + Default>(&self, values: &mut [T]) {
            if self.world.size() == 1 || values.is_empty() {
                return;
            }
            let root = self.world.process_at_rank(0);
            if self.world.rank() == 0 {
                let mut total = vec![T::default(); values.len()];
                root.reduce_into_root(&values[..], &mut total[..], SystemOperation::sum());
                values.copy_from_slice(&total);
            } else {
                root.reduce_into(&values[..], SystemOperation::sum());
            }
            root.broadcast_into(values);
        }
    }

    impl Ranks for MpiWorld {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        fn size(&self) -> usize {
            self.world.size() as usize
        }

        fn sum_f32(&self, values: &mut [f32]) {
            self.sum(values);
        }

        fn sum_f64(&self, values: &mut [f64]) {
            self.sum(values);
        }

        fn gather_to_root(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
            let root = self.world.process_at_rank(0);
            let len = bytes.len() as Count;
            if self.world.rank() != 0 {
                root.gather_into(&len);
                root.gather_varcount_into(bytes);
                return Vec::new();
            }
            let mut counts = vec![0 as Count; self.size()];
            root.gather_into_root(&len, &mut counts[..]);
            let displs: Vec<Count> = counts
                .iter()
                .scan(0, |acc, &c| {
                    let start = *acc;
                    *acc += c;
                    Some(start)
                })
                .collect();
            let mut all = vec![0u8; counts.iter().map(|&c| c as usize).sum()];
            {
                let mut partition = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
                root.gather_varcount_into_root(bytes, &mut partition);
            }
            counts
                .iter()
                .zip(&displs)
                .map(|(&c, &d)| all[d as usize..(d + c) as usize].to_vec())
                .collect()
        }

        fn barrier(&self) {
            self.world.barrier();
        }
    }
}
