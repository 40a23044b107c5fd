# Rules of the demo stage.
