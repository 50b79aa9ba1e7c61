//! nginx in front of gateway nodes, configured from the same template as the compose stack.
