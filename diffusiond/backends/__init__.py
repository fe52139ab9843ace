"""Network runners. A backend runs the text encoder, UNet and VAE; it never owns the loop."""
