"""Early-exit methods. Importing this package registers every method module in ``bench.core.interface.METHODS``;
each module's docstring is its method card."""
from methods import entropy, oracle, patience, threshold  # noqa: F401  (registration side effect)
from methods import boostednet, jeidnn, jeidnn_consistent, msdnet  # noqa: F401  (registration side effect)
from methods import anytime, laplace, sdn, ztw  # noqa: F401  (registration side effect)
