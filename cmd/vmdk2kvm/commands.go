package main

import "github.com/urfave/cli/v2"

// commands lists every subcommand; each lives in a file of its own.
func commands() []*cli.Command {
	return []*cli.Command{
		versionCommand(),
		infoCommand(),
		convertCommand(),
		serveCommand(),
		syncCommand(), cutoverCommand(),
		fixCommand(), withVSpherePlan(planCommand()), pluginsCommand(),
		vsphereCommand(),
		overlayCommand(),
	}
}
