"""lpreg services: learner, generator, local launcher, and the network pieces they share."""
