"""Running the stack: the ``tritonrag`` command line and the local Triton launcher."""
