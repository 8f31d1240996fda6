"""The experiments beside the main run: the claims sweep (`claims`: a baseline and one variant per claim of §3–4,
several seeds each, in a table that says what the seeds can tell) and Figure 1 (`figure1`: §3.1's ReLU-vs-tanh
experiment on CIFAR-10, as the paper ran it). Their tables and plots are written through `pipeline.documents`."""
