"""dloop's HTTP service: a Personalizer-compatible decision API that learns live."""
